//! Supply receipts and stock figures.

use chipgate_domain::ids::Sku;
use chipgate_domain::inventory::StockRecord;
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::service::Records;
use chipgate_runtime::time::{now_ms, ts_opt};
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::Txn;

use crate::convert::stock_to;
use crate::{Error, Inventory, MAX_UNITS, emit, encode, keys};

/// A booked receipt.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ReceiptRecord {
    #[prost(string, tag = "1")]
    pub receipt_id: String,
    #[prost(string, tag = "2")]
    pub sku: String,
    #[prost(uint64, tag = "3")]
    pub units: u64,
    #[prost(string, tag = "4")]
    pub source: String,
    #[prost(uint64, tag = "5")]
    pub receive_ms: u64,
}

fn receipt_to(r: &ReceiptRecord) -> pb::Receipt {
    pb::Receipt {
        receipt_id: r.receipt_id.clone(),
        product_sku: r.sku.clone(),
        units: r.units,
        source: r.source.clone(),
        receive_time: ts_opt(r.receive_ms),
    }
}

impl Inventory {
    pub(crate) async fn receive_supply(
        &self,
        ctx: &RequestContext,
        req: pb::ReceiveSupplyRequest,
    ) -> Result<pb::ReceiveSupplyResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        validate::id(&mut v, "receipt_id", &req.receipt_id);
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku.clone());
        validate::units(&mut v, "units", req.units, MAX_UNITS);
        validate::text(&mut v, "source", &req.source, 200, false);
        let sku = validate::finish(v, sku)?;
        let idem =
            IdemKey::new(&self.inner.idem, "ReceiveSupply", &req.request_id, &req).in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let (sver, mut stock) = self.stock_of(&sku, "product_sku").await?;
                if let Some((_, r)) = self.load::<ReceiptRecord>(keys::receipt(&sku, &req.receipt_id)).await? {
                    // A receipt is booked once, whatever request id carries it again.
                    if r.sku == req.product_sku && r.units == req.units {
                        return Ok((
                            Txn::new(),
                            pb::ReceiveSupplyResponse {
                                receipt: Some(receipt_to(&r)),
                                stock: Some(stock_to(&stock, sver)),
                                newly_booked: false,
                            },
                        ));
                    }
                    return Err(Error::AlreadyExists {
                        kind: "receipt",
                        id: r.receipt_id.clone(),
                        message: format!(
                            "receipt {} was booked as {} x {}; a receipt is booked once",
                            r.receipt_id, r.units, r.sku
                        ),
                    });
                }
                let now = now_ms();
                let r = ReceiptRecord {
                    receipt_id: req.receipt_id.clone(),
                    sku: req.product_sku.clone(),
                    units: req.units,
                    source: req.source.clone(),
                    receive_ms: now,
                };
                stock.receive(req.units);
                stock.update_ms = now;
                let mut t = Txn::new();
                t.replace(keys::receipt(&sku, &r.receipt_id), 0, encode(&r));
                t.replace(keys::stock(&sku), sver, encode(&stock));
                emit(
                    &mut t,
                    ctx,
                    now,
                    &stock,
                    sver + 1,
                    pb::inventory_event::Kind::SupplyReceived(pb::SupplyReceived { receipt: Some(receipt_to(&r)) }),
                );
                Ok((
                    t,
                    pb::ReceiveSupplyResponse {
                        receipt: Some(receipt_to(&r)),
                        stock: Some(stock_to(&stock, sver + 1)),
                        newly_booked: true,
                    },
                ))
            })
            .await?;
        Ok(answer)
    }

    pub(crate) async fn get_stock(&self, req: pb::GetStockRequest) -> Result<pb::GetStockResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "product_sku", req.product_sku);
        let sku = validate::finish(v, sku)?;
        let (ver, s) = self.require::<StockRecord>(keys::stock(&sku), "product", &sku).await?;
        Ok(pb::GetStockResponse { stock: Some(stock_to(&s, ver)) })
    }

    pub(crate) async fn list_stock(&self, _req: pb::ListStockRequest) -> Result<pb::ListStockResponse, Error> {
        let skus = chipgate_contract::catalogue::all(self.store()).await?;
        let skeys: Vec<String> = skus.iter().map(keys::stock).collect();
        let stock =
            self.load_many::<StockRecord>(&skeys).await?.into_iter().flatten().map(|(v, s)| stock_to(&s, v)).collect();
        Ok(pb::ListStockResponse { stock })
    }
}

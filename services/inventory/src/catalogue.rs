//! The product catalogue, and the data file the dev cluster and deployments load it from.

use chipgate_domain::ids::Sku;
use chipgate_domain::inventory::{ProductClass, ProductRecord, StockRecord};
use chipgate_proto::inventory::v1 as pb;
use chipgate_runtime::errors::Violations;
use chipgate_runtime::paging::{self, Page};
use chipgate_runtime::service::Records;
use chipgate_runtime::time::now_ms;
use chipgate_runtime::txn::IdemKey;
use chipgate_runtime::{RequestContext, validate};
use chipgate_state::{Backend, Txn};
use serde::Deserialize;

use crate::convert::{class_from, product_to};
use crate::{Error, Inventory, emit, encode, keys};

/// One product in a catalogue file (JSON array of these).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CatalogueEntry {
    /// SKU.
    pub sku: String,
    /// Name.
    pub name: String,
    /// `export_controlled_accelerator` or `domestic_accelerator`.
    pub class: String,
    /// Performance relative to the H20.
    pub relative_performance: f64,
    /// Vendor.
    pub vendor: String,
}

impl CatalogueEntry {
    /// The API product for this entry.
    ///
    /// # Errors
    /// When the class is unknown.
    pub fn to_product(&self) -> Result<pb::Product, String> {
        let class = match self.class.as_str() {
            "export_controlled_accelerator" => pb::ProductClass::ExportControlledAccelerator,
            "domestic_accelerator" => pb::ProductClass::DomesticAccelerator,
            other => return Err(format!("{}: unknown class {other:?}", self.sku)),
        };
        Ok(pb::Product {
            sku: self.sku.clone(),
            name: self.name.clone(),
            product_class: class as i32,
            relative_performance: self.relative_performance,
            vendor: self.vendor.clone(),
            update_time: None,
        })
    }
}

/// Parses a catalogue (a JSON array of [`CatalogueEntry`]).
///
/// # Errors
/// When the JSON is malformed or a class is unknown.
pub fn parse_catalogue(json: &str) -> Result<Vec<pb::Product>, String> {
    let entries: Vec<CatalogueEntry> = serde_json::from_str(json).map_err(|e| format!("catalogue: {e}"))?;
    entries.iter().map(CatalogueEntry::to_product).collect()
}

/// Reads and parses a catalogue file.
///
/// # Errors
/// When the file can't be read or parsed.
pub fn load_catalogue_file(path: &std::path::Path) -> Result<Vec<pb::Product>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("can't read {}: {e}", path.display()))?;
    parse_catalogue(&text)
}

/// Checks a product; its SKU when that parses.
fn check_product(v: &mut Violations, p: Option<&pb::Product>) -> Option<Sku> {
    let Some(p) = p else {
        v.add("product", "is required");
        return None;
    };
    let sku = validate::parse(v, "product.sku", p.sku.clone());
    validate::text(v, "product.name", &p.name, 200, true);
    if class_from(p.product_class()).is_none() {
        v.add("product.product_class", "must be EXPORT_CONTROLLED_ACCELERATOR or DOMESTIC_ACCELERATOR");
    }
    if !(p.relative_performance.is_finite() && p.relative_performance >= 0.0 && p.relative_performance <= 1000.0) {
        v.add("product.relative_performance", "must be a number between 0 and 1000");
    }
    validate::id(v, "product.vendor", &p.vendor);
    sku
}

impl Inventory {
    pub(crate) async fn upsert_product(
        &self,
        ctx: &RequestContext,
        req: pb::UpsertProductRequest,
    ) -> Result<pb::UpsertProductResponse, Error> {
        let mut v = Violations::new();
        validate::request_id(&mut v, &req.request_id);
        let sku = check_product(&mut v, req.product.as_ref());
        let sku = validate::finish(v, sku)?;
        let p = req.product.clone().unwrap_or_default();
        let idem =
            IdemKey::new(&self.inner.idem, "UpsertProduct", &req.request_id, &req).in_partition(keys::part(&sku));
        let (answer, _) = self
            .run_txn(Some(&idem), || async {
                let now = now_ms();
                let existing = self.load::<ProductRecord>(keys::product(&sku)).await?;
                let stock = self.load::<StockRecord>(keys::stock(&sku)).await?;
                let rec = ProductRecord {
                    sku: p.sku.clone(),
                    name: p.name.clone(),
                    class: class_from(p.product_class()).unwrap_or(ProductClass::Unspecified) as i32,
                    relative_performance: p.relative_performance,
                    vendor: p.vendor.clone(),
                    update_ms: now,
                };
                let mut t = Txn::new();
                t.replace(keys::product(&sku), existing.as_ref().map(|(v, _)| *v).unwrap_or(0), encode(&rec));
                // A new product starts with empty stock; the stock record is what holds and receipts
                // guard on, so it exists from the start.
                let (sver, stock) = match stock {
                    Some((v, s)) => {
                        t.expect_version(keys::stock(&sku), v);
                        (v, s)
                    }
                    None => {
                        let s = StockRecord { update_ms: now, ..StockRecord::empty(&p.sku) };
                        t.replace(keys::stock(&sku), 0, encode(&s));
                        (1, s)
                    }
                };
                emit(
                    &mut t,
                    ctx,
                    now,
                    &stock,
                    sver,
                    pb::inventory_event::Kind::ProductUpserted(pb::ProductUpserted { product: Some(product_to(&rec)) }),
                );
                Ok((t, pb::UpsertProductResponse { product: Some(product_to(&rec)) }))
            })
            .await?;
        // The catalogue lists the product once its partition is ready. A separate step (the list lives in
        // another slot), idempotent, and taken on a replayed call too: a crash between the two is
        // finished by the caller's retry.
        let mut t = Txn::new();
        t.zadd(keys::products(), &p.sku, 0.0);
        self.store().commit(&t).await.map_err(<Error as chipgate_runtime::txn::TxnError>::from_commit)?;
        Ok(answer)
    }

    pub(crate) async fn get_product(&self, req: pb::GetProductRequest) -> Result<pb::GetProductResponse, Error> {
        let mut v = Violations::new();
        let sku = validate::parse::<Sku>(&mut v, "sku", req.sku);
        let sku = validate::finish(v, sku)?;
        let (_, p) = self.require::<ProductRecord>(keys::product(&sku), "product", &sku).await?;
        Ok(pb::GetProductResponse { product: Some(product_to(&p)) })
    }

    pub(crate) async fn list_products(&self, req: pb::ListProductsRequest) -> Result<pb::ListProductsResponse, Error> {
        let mut v = Violations::new();
        let page = Page::parse(&mut v, req.page_size, &req.page_token);
        v.check().map_err(Error::Status)?;
        let start = page.offset();
        let skus = self.store().zrange(&keys::products(), start as i64, (start + page.size) as i64 - 1, false).await?;
        // The catalogue lists SKUs parsed when their products were upserted.
        let pkeys: Vec<String> = skus.iter().map(|(s, _)| keys::product(&Sku::from_trusted(s.as_str()))).collect();
        let products: Vec<pb::Product> =
            self.load_many::<ProductRecord>(&pkeys).await?.into_iter().flatten().map(|(_, p)| product_to(&p)).collect();
        let next =
            if skus.len() == page.size { paging::token(&(start + skus.len()).to_string()) } else { String::new() };
        Ok(pb::ListProductsResponse { products, next_page_token: next })
    }

    /// Upserts every product of a catalogue (idempotent: request ids derive from the SKUs and content).
    ///
    /// # Errors
    /// When a product is refused.
    pub async fn load_catalogue(&self, products: Vec<pb::Product>) -> Result<usize, Error> {
        let ctx = RequestContext::background("catalogue", None);
        let n = products.len();
        for p in products {
            let fp = chipgate_runtime::idempotency::fingerprint(&p).hex();
            let req =
                pb::UpsertProductRequest { request_id: format!("catalogue:{}:{}", p.sku, &fp[..16]), product: Some(p) };
            self.upsert_product(&ctx, req).await?;
        }
        Ok(n)
    }
}

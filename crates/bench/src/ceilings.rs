//! The ceilings of this machine: a bare tonic unary echo (same connection setup and load shape as the
//! placement benchmark), a pipelined no-op Lua script on Redis, and the minimal correct placement
//! (two gRPC hops, one Lua check-and-decrement and one write) with the placement benchmark's load.

use std::time::{Duration, Instant};

use chipgate_proto::bench::v1 as pb;
use chipgate_proto::bench::v1::echo_service_client::EchoServiceClient;
use chipgate_proto::bench::v1::echo_service_server::{EchoService, EchoServiceServer};
use chipgate_proto::orders::v1 as opb;
use chipgate_state::testing::RedisServer;
use prost::Message;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Args;
use crate::load::{self, LoadResult};
use crate::place::SKUS;

struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, r: Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        Ok(Response::new(pb::EchoResponse { payload: r.into_inner().payload }))
    }
}

/// The RPC ceiling: a plain tonic server answering what it is sent.
pub async fn echo(args: &Args) -> LoadResult {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        Server::builder()
            .add_service(EchoServiceServer::new(Echo))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    let channels = load::connections(&url, args.connections).await;
    // About the size of a PlaceOrder request.
    let payload = vec![7u8; 96];
    let result = load::run("echo", &channels, args.in_flight, args.duration, move |ch, _, _| {
        let payload = payload.clone();
        async move { EchoServiceClient::new(ch).echo(pb::EchoRequest { payload }).await.is_ok() }
    })
    .await;
    server.abort();
    result
}

/// What the Redis ceiling measured.
pub struct RedisCeiling {
    /// Scripts run per second.
    pub scripts_per_sec: f64,
    /// Scripts per pipeline.
    pub pipeline: usize,
}

/// The Redis ceiling: `EVALSHA` of `return 1`, pipelined, from several tasks, on a private server.
pub async fn redis(args: &Args) -> RedisCeiling {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("redis url");
    let conn = client.get_multiplexed_async_connection().await.expect("connect redis");
    let script = redis::Script::new("return 1");
    let sha = {
        let mut c = conn.clone();
        script.load_async(&mut c).await.expect("load script")
    };
    const PIPELINE: usize = 64;
    let tasks = 8;
    let duration = args.duration.min(Duration::from_secs(5));
    let pb = load::bar("redis", duration.as_millis() as u64);
    let end = Instant::now() + duration;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let mut c = conn.clone();
        let sha = sha.clone();
        handles.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let mut p = redis::pipe();
                for _ in 0..PIPELINE {
                    p.cmd("EVALSHA").arg(&sha).arg(0);
                }
                if p.query_async::<Vec<i64>>(&mut c).await.is_ok() {
                    n += PIPELINE as u64;
                }
            }
            n
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap_or(0);
    }
    pb.finish_and_clear();
    RedisCeiling { scripts_per_sec: total as f64 / started.elapsed().as_secs_f64().max(1e-9), pipeline: PIPELINE }
}

/// The stock key of the place ceiling (one hash slot per product, as chipgate's own partitions).
fn ceiling_stock(sku: &str) -> String {
    format!("{{inv:{sku}}}:stock")
}

/// Check-and-decrement: the stock is taken only if all of it is there (never below zero).
const TAKE_LUA: &str = r"
local have = tonumber(redis.call('GET', KEYS[1]) or '0')
local want = tonumber(ARGV[1])
if have < want then return -1 end
return redis.call('DECRBY', KEYS[1], want)";

/// The place ceiling's second hop: takes the units of a placement from a product's stock in one
/// `EVALSHA` (the role licensing's quota and inventory's holds play in chipgate).
struct Take {
    redis: redis::aio::MultiplexedConnection,
    sha: String,
}

#[tonic::async_trait]
impl EchoService for Take {
    async fn echo(&self, r: Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        let req = opb::PlaceOrderRequest::decode(r.into_inner().payload.as_slice())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut c = self.redis.clone();
        let left: i64 = redis::cmd("EVALSHA")
            .arg(&self.sha)
            .arg(1)
            .arg(ceiling_stock(&req.product_sku))
            .arg(req.units)
            .query_async(&mut c)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if left < 0 {
            return Err(Status::failed_precondition("not enough stock"));
        }
        Ok(Response::new(pb::EchoResponse { payload: Vec::new() }))
    }
}

/// The place ceiling's first hop: the front a client calls. It asks [`Take`] for the units, then
/// records the order with one `HSET` and answers it RESERVED.
struct Front {
    take: EchoServiceClient<tonic::transport::Channel>,
    redis: redis::aio::MultiplexedConnection,
    seq: std::sync::atomic::AtomicU64,
}

#[tonic::async_trait]
impl EchoService for Front {
    async fn echo(&self, r: Request<pb::EchoRequest>) -> Result<Response<pb::EchoResponse>, Status> {
        let payload = r.into_inner().payload;
        let req =
            opb::PlaceOrderRequest::decode(payload.as_slice()).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.take.clone().echo(pb::EchoRequest { payload }).await?;
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let order = opb::Order {
            order_id: format!("ord-{}-{n}", req.product_sku),
            buyer_id: req.buyer_id,
            product_sku: req.product_sku.clone(),
            units: req.units,
            state: opb::OrderState::Reserved as i32,
            held_units: req.units,
            ..Default::default()
        };
        let record = order.encode_to_vec();
        let mut c = self.redis.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(format!("{{ord:{}}}:orders", req.product_sku))
            .arg(&order.order_id)
            .arg(&record)
            .query_async(&mut c)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::EchoResponse { payload: record }))
    }
}

/// Serves `svc` on a loopback port; returns its URL and the server task.
async fn serve_echo<S: EchoService>(svc: S) -> (String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(
        Server::builder()
            .add_service(EchoServiceServer::new(svc))
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    (url, server)
}

/// The place ceiling: the minimal correct placement — two gRPC hops (client → front → stock), one
/// Lua check-and-decrement and one `HSET` — on its own private Redis, with the load shape and the
/// requests of the placement benchmark. What chipgate's placement would cost if it did nothing
/// else (no idempotency record, queue, licence conditions, history, events or audit): a ceiling,
/// not a peer.
pub async fn place(args: &Args) -> LoadResult {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).expect("redis url");
    let redis = client.get_multiplexed_async_connection().await.expect("connect redis");
    let sha = {
        let mut c = redis.clone();
        redis::Script::new(TAKE_LUA).load_async(&mut c).await.expect("load script")
    };
    let products = args.products.clamp(1, SKUS.len());
    for sku in &SKUS[..products] {
        let mut c = redis.clone();
        let _: () =
            redis::cmd("SET").arg(ceiling_stock(sku)).arg(1_000_000_000u64).query_async(&mut c).await.expect("stock");
    }
    let (take_url, take_server) = serve_echo(Take { redis: redis.clone(), sha }).await;
    let take = EchoServiceClient::new(load::connections(&take_url, 1).await.remove(0));
    let (url, front_server) = serve_echo(Front { take, redis, seq: Default::default() }).await;
    let channels = load::connections(&url, args.connections).await;
    let buyers = args.buyers.max(1);
    let in_flight = args.in_flight.max(1);
    let result = load::run("place ceiling", &channels, in_flight, args.duration, move |ch, task, n| async move {
        let req = crate::place::request(task, n, buyers, products, in_flight);
        let payload = req.encode_to_vec();
        match EchoServiceClient::new(ch).echo(pb::EchoRequest { payload }).await {
            Ok(r) => opb::Order::decode(r.into_inner().payload.as_slice())
                .is_ok_and(|o| o.state() == opb::OrderState::Reserved),
            Err(_) => false,
        }
    })
    .await;
    front_server.abort();
    take_server.abort();
    result
}

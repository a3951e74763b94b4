//! The ceilings of this machine: a bare tonic unary echo (same connection setup and load shape as the
//! placement benchmark) and a pipelined no-op Lua script on Redis.

use std::time::{Duration, Instant};

use chipgate_proto::bench::v1 as pb;
use chipgate_proto::bench::v1::echo_service_client::EchoServiceClient;
use chipgate_proto::bench::v1::echo_service_server::{EchoService, EchoServiceServer};
use chipgate_state::testing::RedisServer;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::Args;
use crate::load::{self, LoadResult};

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

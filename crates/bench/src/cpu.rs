//! CPU time spent during a measured window: each Redis process's (from its own `INFO cpu`, so it
//! counts the server's threads whatever runs them) and this process's (client, services, tonic: from
//! `/proc/self/stat`). Per-node figures show how a Redis Cluster spreads the work over its masters.

use chipgate_state::testing::RedisDeployment;
use chipgate_testkit::Cluster;

/// One Redis node.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its port.
    pub port: u16,
    /// Master (serves slots) or replica.
    pub master: bool,
}

/// CPU seconds spent during a window.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// Each Redis node and its CPU seconds (user + system).
    pub redis: Vec<(Node, f64)>,
    /// This process's CPU seconds (the load generator and the services).
    pub process: f64,
    /// Wall time of the window.
    pub wall: f64,
    /// Commands the masters ran during the window (`INFO commandstats`, summed over masters):
    /// name, calls and server microseconds, most time first.
    pub commands: Vec<(String, u64, u64)>,
}

impl CpuUse {
    /// CPU seconds of the masters together.
    pub fn masters(&self) -> f64 {
        self.redis.iter().filter(|(n, _)| n.master).map(|(_, s)| s).sum()
    }

    /// CPU seconds of the replicas together.
    pub fn replicas(&self) -> f64 {
        self.redis.iter().filter(|(n, _)| !n.master).map(|(_, s)| s).sum()
    }

    /// Cores kept busy on average over the window: this process and every Redis node. Below the
    /// machine's cores, the figure it goes with is bound by waiting (round trips, wake-ups, a single
    /// Redis thread), not by CPU alone.
    pub fn cores_busy(&self) -> f64 {
        (self.process + self.redis.iter().map(|(_, s)| s).sum::<f64>()) / self.wall.max(1e-9)
    }

    /// Each master's share of the masters' CPU, in node order, as "a/b/c %".
    pub fn master_shares(&self) -> String {
        let total = self.masters().max(1e-9);
        let shares: Vec<String> =
            self.redis.iter().filter(|(n, _)| n.master).map(|(_, s)| format!("{:.0}", s / total * 100.0)).collect();
        format!("{} %", shares.join("/"))
    }
}

/// A window being measured.
pub struct CpuMeter {
    nodes: Vec<Node>,
    redis: Vec<Reading>,
    process: f64,
    started: std::time::Instant,
}

fn nodes(cluster: &Cluster) -> Vec<Node> {
    match &cluster.redis {
        Some(RedisDeployment::Single(s)) => vec![Node { port: s.port(), master: true }],
        Some(RedisDeployment::Cluster(c)) => {
            // CLUSTER NODES over a blocking connection: a moment, once per window.
            let masters = tokio::task::block_in_place(|| c.masters());
            c.ports().into_iter().map(|port| Node { port, master: masters.contains(&port) }).collect()
        }
        None => Vec::new(),
    }
}

/// What one Redis process has done so far: its CPU seconds (`used_cpu_sys + used_cpu_user`) and each
/// command's calls and microseconds (`INFO commandstats`).
#[derive(Default)]
struct Reading {
    cpu: f64,
    commands: std::collections::HashMap<String, (u64, u64)>,
}

/// One `INFO cpu commandstats` of the Redis on `port` (all zero when it can't be asked).
async fn reading(port: u16) -> Reading {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return Reading::default() };
    let Ok(mut c) = client.get_multiplexed_async_connection().await else { return Reading::default() };
    let text: String = redis::cmd("INFO").arg("cpu").arg("commandstats").query_async(&mut c).await.unwrap_or_default();
    let cpu_field = |name: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    let mut commands = std::collections::HashMap::new();
    // cmdstat_evalsha:calls=12,usec=345,usec_per_call=28.75,rejected_calls=0,failed_calls=0
    for line in text.lines() {
        let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let field = |f: &str| -> u64 {
            fields.split(',').find_map(|kv| kv.strip_prefix(f)).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        commands.insert(name.to_string(), (field("calls="), field("usec=")));
    }
    Reading { cpu: cpu_field("used_cpu_sys:") + cpu_field("used_cpu_user:"), commands }
}

/// This process's CPU seconds (utime + stime of `/proc/self/stat`, in USER_HZ ticks, which Linux
/// fixes at 100 per second for user space; 0 elsewhere).
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may hold spaces, so split after its closing paren):
    // state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

impl CpuMeter {
    /// Starts measuring the Redis processes of `cluster` and this process.
    pub async fn start(cluster: &Cluster) -> Self {
        let nodes = nodes(cluster);
        let mut redis = Vec::with_capacity(nodes.len());
        for n in &nodes {
            redis.push(reading(n.port).await);
        }
        CpuMeter { nodes, redis, process: process_cpu(), started: std::time::Instant::now() }
    }

    /// What each spent since [`start`](Self::start).
    pub async fn stop(self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64();
        let process = process_cpu() - self.process;
        let mut redis = Vec::with_capacity(self.nodes.len());
        let mut totals: std::collections::HashMap<String, (u64, u64)> = std::collections::HashMap::new();
        for (n, before) in self.nodes.into_iter().zip(self.redis) {
            let now = reading(n.port).await;
            if n.master {
                for (name, (calls, usec)) in now.commands {
                    let (c0, u0) = before.commands.get(&name).copied().unwrap_or((0, 0));
                    let t = totals.entry(name).or_default();
                    t.0 += calls.saturating_sub(c0);
                    t.1 += usec.saturating_sub(u0);
                }
            }
            redis.push((n, (now.cpu - before.cpu).max(0.0)));
        }
        // The meter's own INFO calls are not the workload's.
        totals.remove("info");
        let mut commands: Vec<(String, u64, u64)> =
            totals.into_iter().filter(|(_, (c, _))| *c > 0).map(|(n, (c, u))| (n, c, u)).collect();
        commands.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        CpuUse { redis, process, wall, commands }
    }
}

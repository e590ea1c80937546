//! Private PostgreSQL (syncing its commits, as in production) and Redis
//! for benchmarking several nodes (scripts/bench-cluster.sh). Prints
//! shell assignments (two fresh databases, the Redis URL, the servers'
//! PIDs), then keeps both running until its standard input closes.

use std::io::Read;

fn main() {
    let pg = confab_testpg::Postgres::start_durable();
    let redis = confab_testredis::Redis::start();
    println!("DATABASE_ONE_NODE={}", pg.fresh_database());
    println!("DATABASE_CLUSTER={}", pg.fresh_database());
    println!("REDIS={}", redis.url());
    let pids = [pg.pid(), redis.pid()];
    let pids: Vec<String> = pids.iter().flatten().map(u32::to_string).collect();
    println!("INFRA_PIDS={}", pids.join(","));
    println!("READY=1");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

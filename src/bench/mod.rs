//! `confab bench`: a load generator built on the client library, and the
//! figures it reports (docs/performance.md says how to reproduce them).

mod files;
mod group;
mod load;
mod procfs;
mod report;
mod setup;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use confab_client::{Client, Event};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::{mpsc, watch};

use load::{Clock, Due};
use procfs::CpuMeter;
use report::{Cost, Faults, Idle, Percentiles, Report};
use setup::{Nodes, Target};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,
    /// Measure running servers at these URLs (with --server-pid) instead of
    /// starting one: a load balancer, or several nodes (user i then
    /// connects to the i-th, round robin).
    #[arg(long, global = true, value_delimiter = ',', requires = "server_pid")]
    server: Vec<String>,
    /// PIDs of the nodes, for their CPU time and memory.
    #[arg(long, global = true, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// PIDs of what the nodes run on (PostgreSQL, Redis, a load balancer):
    /// their CPU time, child processes included, is reported beside the
    /// nodes'.
    #[arg(long, global = true, value_delimiter = ',')]
    infra_pid: Vec<u32>,
    /// When starting the servers: this many nodes (more than one needs
    /// --database and --redis).
    #[arg(long, global = true, default_value_t = 1)]
    nodes: usize,
    /// When starting the servers: their PostgreSQL database, instead of
    /// each its own SQLite file.
    #[arg(long, global = true)]
    database: Option<String>,
    /// When starting the servers: the Redis they share presence, routing
    /// and rates through.
    #[arg(long, global = true)]
    redis: Option<String>,
    /// When starting the servers: HAProxy (Debian's haproxy package) in
    /// front of them, round robin, with the PROXY protocol.
    #[arg(long, global = true)]
    haproxy: bool,
    /// When starting the servers: pin them to this CPU with taskset.
    #[arg(long, global = true)]
    server_cpu: Option<usize>,
    /// Print the report as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Repeat the whole run (fresh server each time) and report the median.
    #[arg(long, global = true, default_value_t = 1)]
    runs: usize,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Closed loop: every user keeps a window of unacknowledged messages to
    /// random peers; reports delivered messages/s and latencies.
    Throughput {
        #[command(flatten)]
        load: LoadArgs,
        /// Unacknowledged messages each user keeps in flight.
        #[arg(long, default_value_t = 4)]
        window: usize,
    },
    /// Open loop at a fixed total rate; reports latencies.
    Latency {
        #[command(flatten)]
        load: LoadArgs,
        /// Messages per second, all users together.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
    },
    /// Many authenticated, heartbeating, idle connections; reports server
    /// memory per connection.
    Idle {
        /// Connections to open (stay under the open-files limit of both processes).
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
        /// Accounts they belong to (several sockets per device).
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Keep them open this long (heartbeats keep flowing) before measuring.
        #[arg(long, default_value_t = 30)]
        hold: u64,
        /// Source addresses 127.0.0.1 … 127.0.0.N (about 28,000 connections each).
        #[arg(long)]
        sources: Option<u8>,
    },
    /// One group: a message at a time from a rotating sender; bytes on the
    /// wire, time until every member's device has it, server CPU per
    /// delivered copy, receipt frames per message.
    Group {
        #[arg(long, default_value_t = 100)]
        members: usize,
        /// Members (the first ones) with a second device.
        #[arg(long, default_value_t = 20)]
        second_devices: usize,
        #[arg(long, default_value_t = 200)]
        messages: usize,
        #[arg(long, default_value_t = 300)]
        body_bytes: usize,
    },
    /// One large file up and down through the server, beside the disk's
    /// own write speed (dd conv=fsync), with server CPU per GiB; then
    /// server memory while many users upload at once.
    Files {
        /// Size of the one file, MiB.
        #[arg(long, default_value_t = 1024)]
        file_mib: u64,
        /// Users uploading at once, one file each.
        #[arg(long, default_value_t = 20)]
        concurrent: usize,
        /// Size of each of their files, MiB.
        #[arg(long, default_value_t = 200)]
        concurrent_mib: u64,
    },
}

#[derive(Args, Debug, Clone)]
struct LoadArgs {
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before the measurement starts.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Peers each user writes to (conversations opened before the run).
    #[arg(long, default_value_t = 8)]
    peers: usize,
    /// Size of each message's encrypted content, in bytes. On the wire each
    /// body is a whole envelope for two devices in base64url: 300 bytes of
    /// content make a body of about 740 characters.
    #[arg(long, default_value_t = 300)]
    body_bytes: usize,
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<28} [{bar:30}] {pos}/{len} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // Thousands of sockets need the open-files limit at its hard maximum.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        let report = run_once(&args).await?;
        if args.runs > 1 && !args.json {
            eprintln!("run {run}: {}", report.summary());
        }
        reports.push(report);
    }
    let report = Report::median(&reports);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"median": report, "runs": reports}))?
        );
    } else {
        report.print_table();
    }
    anyhow::ensure!(
        !report.faults.any(),
        "FAILED: the run broke a delivery promise: {:?}",
        report.faults
    );
    Ok(())
}

/// One run, on a fresh server unless one was given.
async fn run_once(args: &BenchArgs) -> anyhow::Result<Report> {
    let target = if args.server.is_empty() {
        anyhow::ensure!(
            args.nodes <= 1 || (args.database.is_some() && args.redis.is_some()),
            "several nodes share a --database (PostgreSQL) and a --redis"
        );
        let haproxy = match args.haproxy {
            true => Some(haproxy_bin()?),
            false => None,
        };
        let nodes = Nodes {
            count: args.nodes,
            cpu: args.server_cpu,
            database: args.database.clone(),
            redis: args.redis.clone(),
            haproxy,
        };
        Target::start(&nodes, &args.infra_pid).await?
    } else {
        anyhow::ensure!(!args.server_pid.is_empty(), "--server-pid");
        Target::external(&args.server, &args.server_pid, &args.infra_pid)?
    };
    let bar = progress_bar();
    let report = match &args.mode {
        Mode::Throughput { load, window } => {
            let settings = format!(
                "window {window}, {} peers, {} byte messages in envelopes",
                load.peers, load.body_bytes
            );
            run_load(
                &target,
                load,
                Pace::Closed { window: *window },
                settings,
                &bar,
            )
            .await?
        }
        Mode::Latency { load, rate } => {
            let settings = format!(
                "{rate} msg/s open loop, {} peers, {} byte messages in envelopes",
                load.peers, load.body_bytes
            );
            run_load(&target, load, Pace::Open { rate: *rate }, settings, &bar).await?
        }
        Mode::Idle {
            connections,
            users,
            hold,
            sources,
        } => run_idle(&target, *connections, *users, *hold, *sources, &bar).await?,
        Mode::Files {
            file_mib,
            concurrent,
            concurrent_mib,
        } => files::run(&target, *file_mib, *concurrent, *concurrent_mib, &bar).await?,
        Mode::Group {
            members,
            second_devices,
            messages,
            body_bytes,
        } => {
            group::run(
                &target,
                *members,
                *second_devices,
                *messages,
                *body_bytes,
                &bar,
            )
            .await?
        }
    };
    bar.finish_and_clear();
    Ok(report)
}

enum Pace {
    Closed { window: usize },
    Open { rate: u64 },
}

/// Debian installs HAProxy in /usr/sbin, often not on PATH.
fn haproxy_bin() -> anyhow::Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|bin| bin.is_file())
        .context("--haproxy: no haproxy on PATH or in /usr/sbin (apt-get install haproxy)")
}

fn load_cores_available() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The meters of one measurement: the nodes, what they run on, and the
/// load generator itself.
struct Meters {
    server: CpuMeter,
    infra: CpuMeter,
    me: CpuMeter,
}

impl Meters {
    fn start(target: &Target) -> Self {
        Self {
            server: CpuMeter::start(&target.nodes, false),
            infra: CpuMeter::start(&target.infra, true),
            me: CpuMeter::start(&[std::process::id()], false),
        }
    }
}

fn cost(target: &Target, meters: &Meters) -> Cost {
    let (server_cpu_seconds, server_cores) = meters.server.read();
    let (infra_cpu_seconds, infra_cores) = meters.infra.read();
    let (_, load_cores) = meters.me.read();
    let available = load_cores_available();
    Cost {
        nodes: target.nodes.len(),
        server_cpu_seconds,
        server_cores,
        infra_cpu_seconds,
        infra_cores,
        server_rss_mib: procfs::rss_kib(&target.nodes) as f64 / 1024.0,
        load_cores,
        load_cores_available: available,
        load_limited: load_cores > 0.9 * available as f64,
    }
}

async fn run_load(
    target: &Target,
    args: &LoadArgs,
    pace: Pace,
    settings: String,
    bar: &ProgressBar,
) -> anyhow::Result<Report> {
    let accounts = setup::provision(&target.url, args.users, bar).await?;
    bar.set_message("connecting");
    bar.set_position(0);
    let mut clients = Vec::with_capacity(accounts.len());
    let mut events = Vec::with_capacity(accounts.len());
    for (i, account) in accounts.iter().enumerate() {
        let (client, stream) = setup::connect(target.socket_url(i), account, None).await?;
        clients.push(Arc::new(client));
        events.push(stream);
        bar.inc(1);
    }
    let convs = setup::open_conversations(&clients, args.peers, &accounts).await?;
    let devices = Arc::new(accounts.iter().map(|a| a.device.0).collect::<Vec<_>>());

    let clock = Clock::new();
    let (stop_receivers, stopped) = watch::channel(false);
    let receivers: Vec<_> = clients
        .iter()
        .zip(events)
        .map(|(client, events)| {
            tokio::spawn(load::receive(
                client.clone(),
                events,
                clock.clone(),
                stopped.clone(),
            ))
        })
        .collect();
    let mut due_senders = Vec::new();
    let senders: Vec<_> = clients
        .iter()
        .zip(&convs)
        .enumerate()
        .map(|(i, (client, convs))| {
            let (client, clock, bodies) = (
                client.clone(),
                clock.clone(),
                load::Bodies::new(i as u32, devices.clone(), args.body_bytes),
            );
            match pace {
                Pace::Closed { window } => tokio::spawn(load::send_closed(
                    client,
                    convs.clone(),
                    window,
                    clock,
                    bodies,
                )),
                Pace::Open { .. } => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    due_senders.push(tx);
                    tokio::spawn(load::send_open(client, rx, clock, bodies))
                }
            }
        })
        .collect();
    if let Pace::Open { rate } = pace {
        tokio::spawn(schedule(clock.clone(), rate, due_senders, convs.clone()));
    }

    let total = args.warmup + args.duration;
    bar.set_length(total);
    bar.set_position(0);
    bar.set_message("warming up");
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    bar.set_position(args.warmup);
    bar.set_message("measuring");
    let meters = Meters::start(target);
    clock.open_window();
    let started = Instant::now();
    for second in 1..=args.duration {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        bar.set_position(args.warmup + second);
    }
    clock.close_window();
    let duration_seconds = started.elapsed().as_secs_f64();
    let cost = cost(target, &meters);
    clock.stop_sending();

    bar.set_message("draining");
    let mut sent = Vec::new();
    for sender in senders {
        sent.push(sender.await?);
    }
    let acked: u64 = sent.iter().map(|s| s.acked.len() as u64).sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while clock.received.load(Ordering::Relaxed) < acked && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_receivers.send(true)?;
    let mut received = Vec::new();
    for receiver in receivers {
        received.push(receiver.await?);
    }

    let mut faults = Faults::default();
    for (sender, report) in sent.iter().enumerate() {
        faults.errors += report.errors;
        for &(recipient, counter) in &report.acked {
            if !received[recipient as usize]
                .received
                .contains(&(sender as u32, counter))
            {
                faults.lost += 1;
            }
        }
    }
    let (mut ack, mut deliver) = (load::histogram(), load::histogram());
    let mut delivered = 0;
    for r in &received {
        deliver.add(&r.deliver).context("merge histograms")?;
        faults.duplicated += r.duplicates;
        faults.out_of_order += r.out_of_order;
        faults.disconnects += r.disconnected as u64;
        delivered += r.delivered_in_window;
    }
    let mut lateness = load::histogram();
    for s in &sent {
        ack.add(&s.ack).context("merge histograms")?;
        for &late in &s.lateness {
            let _ = lateness.record(late.max(1));
        }
    }
    for client in &clients {
        faults.wire_duplicates += client.state().duplicates();
        faults.gaps += client.state().gaps();
    }
    Ok(Report {
        mode: match pace {
            Pace::Closed { .. } => "throughput".into(),
            Pace::Open { .. } => "latency".into(),
        },
        users: args.users,
        settings,
        duration_seconds,
        delivered,
        delivered_per_second: delivered as f64 / duration_seconds,
        server_cpu_us_per_message: (delivered > 0)
            .then(|| cost.server_cpu_seconds * 1e6 / delivered as f64),
        infra_cpu_us_per_message: (delivered > 0 && !target.infra.is_empty())
            .then(|| cost.infra_cpu_seconds * 1e6 / delivered as f64),
        send_to_sent: Percentiles::of(&ack),
        send_to_deliver: Percentiles::of(&deliver),
        scheduler_lateness: matches!(pace, Pace::Open { .. }).then(|| Percentiles::of(&lateness)),
        idle: None,
        files: None,
        group: None,
        cost,
        faults,
    })
}

/// Hands out sends at `rate` per second, round robin over users and their
/// peers, each with the time it is due.
async fn schedule(
    clock: Arc<Clock>,
    rate: u64,
    users: Vec<mpsc::UnboundedSender<Due>>,
    convs: Vec<Vec<(usize, confab_protocol::ConversationId)>>,
) {
    let interval_ns = 1_000_000_000 / rate.max(1);
    let start = clock.now_ns();
    for i in 0u64.. {
        let due_ns = start + i * interval_ns;
        tokio::time::sleep_until(clock.at(due_ns)).await;
        if !clock.sending() {
            return;
        }
        let user = (i as usize) % users.len();
        let mine = &convs[user];
        let (peer, conv) = mine[(i as usize / users.len()) % mine.len()];
        let _ = users[user].send(Due {
            conv,
            peer: peer as u32,
            due_ns,
        });
    }
}

async fn run_idle(
    target: &Target,
    connections: usize,
    users: usize,
    hold: u64,
    sources: Option<u8>,
    bar: &ProgressBar,
) -> anyhow::Result<Report> {
    let accounts = setup::provision(&target.url, users.max(1), bar).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = procfs::rss_kib(&target.nodes);
    let sources = sources.unwrap_or((connections / 25_000 + 1) as u8).max(1);
    let per_source = connections.div_ceil(sources as usize);
    bar.set_message("connecting");
    bar.set_length(connections as u64);
    bar.set_position(0);
    let (closed_tx, closed_rx) = watch::channel(0u64);
    let closed_tx = Arc::new(closed_tx);
    let mut clients: Vec<Client> = Vec::with_capacity(connections);
    let indexes: Vec<usize> = (0..connections).collect();
    for chunk in indexes.chunks(64) {
        let opening = chunk.iter().map(|&i| {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / per_source) as u8));
            setup::connect(
                target.socket_url(i),
                &accounts[i % accounts.len()],
                Some(source),
            )
        });
        for opened in futures_util::future::join_all(opening).await {
            let (client, mut events) = opened.context("open an idle connection")?;
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    if matches!(event, Event::Closed(_)) {
                        closed.send_modify(|n| *n += 1);
                    }
                }
            });
            clients.push(client);
            bar.inc(1);
        }
    }
    bar.set_message("holding");
    bar.set_length(hold);
    bar.set_position(0);
    let meters = Meters::start(target);
    for second in 1..=hold {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.set_position(second);
    }
    let after = procfs::rss_kib(&target.nodes);
    let cost = cost(target, &meters);
    let faults = Faults {
        disconnects: *closed_rx.borrow(),
        ..Faults::default()
    };
    drop(clients);
    Ok(Report {
        mode: "idle".into(),
        users,
        settings: format!(
            "{connections} connections from {sources} source addresses, held {hold} s"
        ),
        duration_seconds: hold as f64,
        idle: Some(Idle {
            connections,
            rss_per_connection_kib: after.saturating_sub(before) as f64 / connections as f64,
            server_rss_before_mib: before as f64 / 1024.0,
            server_rss_after_mib: after as f64 / 1024.0,
            read_buffer_bytes: confab_server::WS_READ_BUFFER_BYTES,
        }),
        cost,
        faults,
        ..Report::default()
    })
}

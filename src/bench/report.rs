//! What a run found, as a table for people or JSON for scripts.

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |ns: u64| ns as f64 / 1e6;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Promises checked by every mode; any non-zero count fails the run.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Faults {
    /// Acked but never received.
    pub lost: u64,
    /// Received twice by the application.
    pub duplicated: u64,
    /// Received before an earlier message of the same sender and conversation.
    pub out_of_order: u64,
    /// Dropped by the client library as already seen (none expected without reconnects).
    pub wire_duplicates: u64,
    /// Conversations that skipped a seq.
    pub gaps: u64,
    /// Sends that failed.
    pub errors: u64,
    /// Connections that closed during the run.
    pub disconnects: u64,
}

impl Faults {
    pub fn any(&self) -> bool {
        self.lost
            + self.duplicated
            + self.out_of_order
            + self.wire_duplicates
            + self.gaps
            + self.errors
            + self.disconnects
            > 0
    }
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Nodes measured; the server figures are theirs together.
    pub nodes: usize,
    pub server_cpu_seconds: f64,
    /// Average cores the server used during the measurement.
    pub server_cores: f64,
    /// What the nodes run on (--infra-pid, HAProxy), child processes included.
    pub infra_cpu_seconds: f64,
    pub infra_cores: f64,
    pub server_rss_mib: f64,
    /// Average cores the load generator used.
    pub load_cores: f64,
    /// Cores the load generator may run on.
    pub load_cores_available: usize,
    /// True when the load generator was the bottleneck, not the server.
    pub load_limited: bool,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct Report {
    pub mode: String,
    pub users: usize,
    pub settings: String,
    pub duration_seconds: f64,
    pub delivered: u64,
    pub delivered_per_second: f64,
    pub server_cpu_us_per_message: Option<f64>,
    /// CPU of what the nodes run on, per delivered message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infra_cpu_us_per_message: Option<f64>,
    pub send_to_sent: Percentiles,
    pub send_to_deliver: Percentiles,
    /// Open loop: how late the load generator sent, after each send was due.
    pub scheduler_lateness: Option<Percentiles>,
    pub idle: Option<Idle>,
    pub files: Option<super::files::Transfer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<super::group::GroupFigures>,
    pub cost: Cost,
    pub faults: Faults,
}

#[derive(Serialize, Debug, Clone, Copy, Default)]
pub struct Idle {
    pub connections: usize,
    pub rss_per_connection_kib: f64,
    pub server_rss_before_mib: f64,
    pub server_rss_after_mib: f64,
    pub read_buffer_bytes: usize,
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

impl Percentiles {
    fn median(all: &[Percentiles]) -> Self {
        Self {
            count: all.iter().map(|p| p.count).sum(),
            p50_ms: median(all.iter().map(|p| p.p50_ms)),
            p99_ms: median(all.iter().map(|p| p.p99_ms)),
            p999_ms: median(all.iter().map(|p| p.p999_ms)),
            max_ms: median(all.iter().map(|p| p.max_ms)),
        }
    }
}

impl Report {
    /// Each figure is the median over the runs (for an even count, the
    /// upper middle); faults are summed: one in any run fails them all.
    pub fn median(runs: &[Report]) -> Report {
        let first = runs.first().cloned().unwrap_or_default();
        let m = |f: &dyn Fn(&Report) -> f64| median(runs.iter().map(f));
        let mut faults = Faults::default();
        for r in runs {
            let f = &r.faults;
            faults.lost += f.lost;
            faults.duplicated += f.duplicated;
            faults.out_of_order += f.out_of_order;
            faults.wire_duplicates += f.wire_duplicates;
            faults.gaps += f.gaps;
            faults.errors += f.errors;
            faults.disconnects += f.disconnects;
        }
        let lateness: Vec<Percentiles> = runs.iter().filter_map(|r| r.scheduler_lateness).collect();
        Report {
            mode: first.mode.clone(),
            users: first.users,
            settings: if runs.len() > 1 {
                format!("{}; median of {} runs", first.settings, runs.len())
            } else {
                first.settings.clone()
            },
            duration_seconds: m(&|r| r.duration_seconds),
            delivered: median(runs.iter().map(|r| r.delivered as f64)) as u64,
            delivered_per_second: m(&|r| r.delivered_per_second),
            server_cpu_us_per_message: first
                .server_cpu_us_per_message
                .map(|_| m(&|r| r.server_cpu_us_per_message.unwrap_or(0.0))),
            infra_cpu_us_per_message: first
                .infra_cpu_us_per_message
                .map(|_| m(&|r| r.infra_cpu_us_per_message.unwrap_or(0.0))),
            send_to_sent: Percentiles::median(
                &runs.iter().map(|r| r.send_to_sent).collect::<Vec<_>>(),
            ),
            send_to_deliver: Percentiles::median(
                &runs.iter().map(|r| r.send_to_deliver).collect::<Vec<_>>(),
            ),
            scheduler_lateness: (!lateness.is_empty()).then(|| Percentiles::median(&lateness)),
            idle: first.idle.map(|idle| Idle {
                rss_per_connection_kib: m(&|r| r.idle.map_or(0.0, |i| i.rss_per_connection_kib)),
                server_rss_before_mib: m(&|r| r.idle.map_or(0.0, |i| i.server_rss_before_mib)),
                server_rss_after_mib: m(&|r| r.idle.map_or(0.0, |i| i.server_rss_after_mib)),
                ..idle
            }),
            files: first.files.map(|f| {
                let t = |g: &dyn Fn(&super::files::Transfer) -> f64| {
                    m(&|r| r.files.map_or(0.0, |f| g(&f)))
                };
                super::files::Transfer {
                    disk_write_mib_per_second: t(&|f| f.disk_write_mib_per_second),
                    upload_mib_per_second: t(&|f| f.upload_mib_per_second),
                    download_mib_per_second: t(&|f| f.download_mib_per_second),
                    upload_of_disk: t(&|f| f.upload_of_disk),
                    server_cpu_seconds_per_gib_up: t(&|f| f.server_cpu_seconds_per_gib_up),
                    server_cpu_seconds_per_gib_down: t(&|f| f.server_cpu_seconds_per_gib_down),
                    concurrent_mib_per_second: t(&|f| f.concurrent_mib_per_second),
                    server_rss_idle_mib: t(&|f| f.server_rss_idle_mib),
                    server_rss_max_mib: t(&|f| f.server_rss_max_mib),
                    ..f
                }
            }),
            group: first.group.map(|g| {
                let t = |f: &dyn Fn(&super::group::GroupFigures) -> f64| {
                    m(&|r| r.group.map_or(0.0, |g| f(&g)))
                };
                super::group::GroupFigures {
                    to_every_device: Percentiles::median(
                        &runs
                            .iter()
                            .filter_map(|r| r.group.map(|g| g.to_every_device))
                            .collect::<Vec<_>>(),
                    ),
                    server_cpu_us_per_delivered_copy: t(&|g| g.server_cpu_us_per_delivered_copy),
                    receipt_frames_per_message: t(&|g| g.receipt_frames_per_message),
                    ..g
                }
            }),
            cost: Cost {
                nodes: first.cost.nodes,
                server_cpu_seconds: m(&|r| r.cost.server_cpu_seconds),
                server_cores: m(&|r| r.cost.server_cores),
                infra_cpu_seconds: m(&|r| r.cost.infra_cpu_seconds),
                infra_cores: m(&|r| r.cost.infra_cores),
                server_rss_mib: m(&|r| r.cost.server_rss_mib),
                load_cores: m(&|r| r.cost.load_cores),
                load_cores_available: first.cost.load_cores_available,
                load_limited: runs.iter().any(|r| r.cost.load_limited),
            },
            faults,
        }
    }

    /// One line per run, for progress while several runs go.
    pub fn summary(&self) -> String {
        if let Some(g) = &self.group {
            return format!(
                "to every device p50 {:.2} ms p99 {:.2} ms, {:.1} us CPU per copy, {:.0} receipts per message",
                g.to_every_device.p50_ms,
                g.to_every_device.p99_ms,
                g.server_cpu_us_per_delivered_copy,
                g.receipt_frames_per_message
            );
        }
        if let Some(f) = &self.files {
            return format!(
                "up {:.0} MiB/s ({:.2} of the disk's {:.0}), down {:.0} MiB/s, {} at once: RSS max {:.1} MiB",
                f.upload_mib_per_second,
                f.upload_of_disk,
                f.disk_write_mib_per_second,
                f.download_mib_per_second,
                f.concurrent_uploads,
                f.server_rss_max_mib
            );
        }
        match &self.idle {
            Some(idle) => format!("{:.2} KiB per connection", idle.rss_per_connection_kib),
            None => format!(
                "{:.0} msg/s, deliver p50 {:.3} ms p99 {:.3} ms, {:.1} us CPU/msg",
                self.delivered_per_second,
                self.send_to_deliver.p50_ms,
                self.send_to_deliver.p99_ms,
                self.server_cpu_us_per_message.unwrap_or(0.0)
            ),
        }
    }

    pub fn print_table(&self) {
        println!();
        println!(
            "confab bench {} ({} users, {})",
            self.mode, self.users, self.settings
        );
        if let Some(g) = &self.group {
            println!(
                "  on the wire   send {} B, each msg {} B, all {} copies {} B",
                g.send_frame_bytes,
                g.msg_frame_bytes,
                g.devices - 1,
                g.fan_out_bytes
            );
            println!(
                "  to every device  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} messages)",
                g.to_every_device.p50_ms,
                g.to_every_device.p99_ms,
                g.to_every_device.max_ms,
                g.messages
            );
            println!(
                "  server CPU    {:.1} us per delivered copy",
                g.server_cpu_us_per_delivered_copy
            );
            println!(
                "  receipts      {:.1} frames per message (all devices)",
                g.receipt_frames_per_message
            );
            return;
        }
        if let Some(f) = &self.files {
            println!(
                "  disk write (dd fsync)  {:>10.0} MiB/s",
                f.disk_write_mib_per_second
            );
            println!(
                "  upload                 {:>10.0} MiB/s  ({:.2} of the disk), server {:.2} CPU s per GiB",
                f.upload_mib_per_second, f.upload_of_disk, f.server_cpu_seconds_per_gib_up
            );
            println!(
                "  download               {:>10.0} MiB/s  server {:.2} CPU s per GiB",
                f.download_mib_per_second, f.server_cpu_seconds_per_gib_down
            );
            println!(
                "  {} uploads at once     {:>10.0} MiB/s together, server RSS {:.1} MiB idle -> {:.1} MiB at most",
                f.concurrent_uploads,
                f.concurrent_mib_per_second,
                f.server_rss_idle_mib,
                f.server_rss_max_mib
            );
            return;
        }
        if let Some(idle) = &self.idle {
            println!("  connections            {:>10}", idle.connections);
            println!(
                "  server RSS             {:>10.1} MiB -> {:.1} MiB",
                idle.server_rss_before_mib, idle.server_rss_after_mib
            );
            println!(
                "  RSS per connection     {:>10.2} KiB  (read buffer {} bytes)",
                idle.rss_per_connection_kib, idle.read_buffer_bytes
            );
        } else {
            println!(
                "  delivered              {:>10.0} msg/s  ({} in {:.1} s)",
                self.delivered_per_second, self.delivered, self.duration_seconds
            );
            let row = |name: &str, p: &Percentiles| {
                println!(
                    "  {name:<22} p50 {:>7.3} ms   p99 {:>7.3} ms   p99.9 {:>7.3} ms   max {:>8.3} ms",
                    p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms
                );
            };
            row("send -> sent ack", &self.send_to_sent);
            row("send -> deliver", &self.send_to_deliver);
            if let Some(late) = &self.scheduler_lateness {
                row("(scheduler lateness)", late);
            }
            if let Some(us) = self.server_cpu_us_per_message {
                println!("  server CPU per message {us:>10.2} us");
            }
            if let Some(us) = self.infra_cpu_us_per_message {
                println!("  infra CPU per message  {us:>10.2} us  (PostgreSQL, Redis, HAProxy)");
            }
        }
        let c = &self.cost;
        println!(
            "  server                 {:>10.2} cores, {:.1} MiB RSS{}",
            c.server_cores,
            c.server_rss_mib,
            match c.nodes {
                0 | 1 => String::new(),
                n => format!("  ({n} nodes together)"),
            }
        );
        if c.infra_cores > 0.0 {
            println!("  infra                  {:>10.2} cores", c.infra_cores);
        }
        println!(
            "  load generator         {:>10.2} of {} cores{}",
            c.load_cores,
            c.load_cores_available,
            if c.load_limited {
                "  <- saturated: the figures above are the load generator's limit, not the server's"
            } else {
                ""
            }
        );
        let f = &self.faults;
        println!(
            "  lost {}  duplicated {}  out of order {}  wire duplicates {}  gaps {}  errors {}  disconnects {}",
            f.lost,
            f.duplicated,
            f.out_of_order,
            f.wire_duplicates,
            f.gaps,
            f.errors,
            f.disconnects
        );
    }
}

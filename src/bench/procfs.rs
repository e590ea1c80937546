//! What a process costs, read from /proc: CPU time and resident memory.

use std::time::Duration;

/// CPU time of `pid`, threads that already ended included (`utime` +
/// `stime` of /proc/<pid>/stat, in clock ticks of 10 ms: fine for runs of
/// seconds).
pub fn cpu_time(pid: u32) -> Duration {
    const TICKS_PER_SECOND: u64 = 100;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces; the fields after it do not.
    let Some(after_name) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// Resident set size of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// CPU time and wall time between two readings.
#[derive(Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    cpu: Duration,
    wall: std::time::Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Self {
        Self {
            pid,
            cpu: cpu_time(pid),
            wall: std::time::Instant::now(),
        }
    }

    /// (CPU seconds used, cores used on average) since `start`.
    pub fn read(&self) -> (f64, f64) {
        let cpu = cpu_time(self.pid).saturating_sub(self.cpu).as_secs_f64();
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        (cpu, cpu / wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me) > 0);
        let meter = CpuMeter::start(me);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let (cpu, _) = meter.read();
        assert!(cpu > 0.0, "busy work shows up as CPU time");
    }
}

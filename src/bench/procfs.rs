//! What a process costs, read from /proc: CPU time and resident memory.

use std::collections::HashMap;
use std::time::Duration;

/// CPU time of `pid`, threads that already ended included (`utime` +
/// `stime` of /proc/<pid>/stat, in clock ticks of 10 ms: fine for runs of
/// seconds).
pub fn cpu_time(pid: u32) -> Duration {
    const TICKS_PER_SECOND: u64 = 100;
    let ticks: u64 = [11, 12].iter().filter_map(|&i| stat_field(pid, i)).sum();
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// Field `i` of /proc/<pid>/stat, counted after the command name: 1 is
/// the parent's PID, 11 and 12 utime and stime (14 and 15 of the whole
/// line).
fn stat_field(pid: u32, i: usize) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(i)?.parse().ok()
}

/// `roots` and every process descending from them (PostgreSQL forks a
/// backend per connection).
fn with_descendants(roots: &[u32]) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, stat_field(pid, 1)? as u32)))
        .collect();
    let mut all = roots.to_vec();
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|&&(pid, ppid)| ppid == parent && !all.contains(&pid))
                .map(|&(pid, _)| pid)
                .collect::<Vec<_>>(),
        );
        i += 1;
    }
    all
}

/// Resident set size of `pids` together, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// CPU time of some processes together, and wall time, between two
/// readings.
#[derive(Clone)]
pub struct CpuMeter {
    pids: Vec<u32>,
    children: bool,
    cpu: HashMap<u32, Duration>,
    wall: std::time::Instant,
}

impl CpuMeter {
    /// Of `pids`; with `children`, of every process descending from them
    /// too (a process that starts meanwhile counts from zero; one that
    /// ends meanwhile is not counted).
    pub fn start(pids: &[u32], children: bool) -> Self {
        let mut meter = Self {
            pids: pids.to_vec(),
            children,
            cpu: HashMap::new(),
            wall: std::time::Instant::now(),
        };
        meter.cpu = meter.now();
        meter
    }

    fn now(&self) -> HashMap<u32, Duration> {
        let pids = match self.children {
            true => with_descendants(&self.pids),
            false => self.pids.clone(),
        };
        pids.into_iter().map(|pid| (pid, cpu_time(pid))).collect()
    }

    /// (CPU seconds used, cores used on average) since `start`.
    pub fn read(&self) -> (f64, f64) {
        let cpu: Duration = self
            .now()
            .into_iter()
            .map(|(pid, now)| now.saturating_sub(self.cpu.get(&pid).copied().unwrap_or_default()))
            .sum();
        let cpu = cpu.as_secs_f64();
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
        assert!(rss_kib(&[me]) > 0);
        let meter = CpuMeter::start(&[me], false);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let (cpu, _) = meter.read();
        assert!(cpu > 0.0, "busy work shows up as CPU time");
    }

    #[test]
    fn finds_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let all = with_descendants(&[std::process::id()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(all.contains(&child.id()), "{all:?}");
        assert_eq!(all[0], std::process::id());
    }
}

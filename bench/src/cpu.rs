//! CPU time and memory accounting: the server's from /proc (the process and
//! all of its descendants), our own from getrusage and /proc/self.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second used by the utime/stime fields of /proc/PID/stat.
fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The fields of /proc/PID/stat after the command name (which may itself
/// contain spaces and parentheses), starting with field 3 (`state`).
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let close = text.rfind(')')?;
    Some(text[close + 1..].split_ascii_whitespace().collect())
}

/// `(ppid, utime + stime in ticks)` of one process; its threads are already
/// summed by the kernel.
fn read_stat(pid: u32) -> Option<(u32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields = stat_fields(&text)?;
    // Field 4 is ppid, fields 14 and 15 are utime and stime (1-based).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// A number field of /proc/PID/status: `VmRSS` (in kB),
/// `voluntary_ctxt_switches`.
fn status_number(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_ascii_whitespace().next()?.parse().ok()
    })
}

/// Resident set size of one process, in KiB (0 for kernel threads).
fn rss_kib(pid: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(status_number(&text, "VmRSS").unwrap_or(0))
}

/// Context switches of one process so far, its threads summed (the
/// kernel counts them per thread, in /proc/PID/task/TID/status).
fn read_switches(pid: u32) -> Option<Switches> {
    let threads = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    // A thread that has just exited is gone, with its counts.
    let texts = threads
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("status")).ok());
    Some(
        texts
            .map(|text| Switches {
                voluntary: status_number(&text, "voluntary_ctxt_switches").unwrap_or(0),
                involuntary: status_number(&text, "nonvoluntary_ctxt_switches").unwrap_or(0),
            })
            .sum(),
    )
}

/// Context switches of a set of processes: `voluntary` ones are a thread
/// going to sleep (to be woken later: by a message, a timer);
/// `involuntary` ones are a runnable thread preempted for another.
#[derive(Clone, Copy, Debug, Default)]
pub struct Switches {
    pub voluntary: u64,
    pub involuntary: u64,
}

impl std::ops::Add for Switches {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            voluntary: self.voluntary + other.voluntary,
            involuntary: self.involuntary + other.involuntary,
        }
    }
}

impl std::iter::Sum for Switches {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

impl Switches {
    /// The switches from `earlier` to these.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

/// A process and all of its descendants, found by walking /proc.
pub struct ProcessTree {
    pids: Vec<u32>,
    ticks_per_s: f64,
}

impl ProcessTree {
    /// Finds `root` and every process below it. Fails if `root` is gone.
    pub fn discover(root: u32) -> Result<Self, String> {
        if read_stat(root).is_none() {
            return Err(format!("cannot read /proc/{root}/stat"));
        }
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((ppid, _)) = read_stat(pid) {
                    children.entry(ppid).or_default().push(pid);
                }
            }
        }
        let mut pids = vec![root];
        let mut next = 0;
        while next < pids.len() {
            if let Some(kids) = children.get(&pids[next]) {
                pids.extend(kids.iter().copied().filter(|k| *k != root));
            }
            next += 1;
        }
        Ok(Self {
            pids,
            ticks_per_s: clock_ticks_per_s(),
        })
    }

    pub fn process_count(&self) -> usize {
        self.pids.len()
    }

    /// CPU seconds (user + system) used so far by the processes still alive.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks: u64 = self
            .pids
            .iter()
            .filter_map(|pid| read_stat(*pid))
            .map(|(_, t)| t)
            .sum();
        ticks as f64 / self.ticks_per_s
    }

    /// Context switches so far of the processes still alive, summed.
    pub fn switches(&self) -> Switches {
        self.pids.iter().filter_map(|pid| read_switches(*pid)).sum()
    }

    /// Resident memory of the processes still alive, summed, in KiB. Pages
    /// shared between them (a forked worker's) count once per process.
    pub fn rss_kib(&self) -> u64 {
        self.pids
            .iter()
            .filter_map(|pid| rss_kib(&pid.to_string()))
            .sum()
    }
}

/// Resident memory of this process, in KiB.
pub fn own_rss_kib() -> u64 {
    rss_kib("self").unwrap_or(0)
}

/// CPU seconds (user + system) used so far by this process, all threads.
pub fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we hand it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line = "42 (a b) c) S 7 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0";
        let f = stat_fields(line).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!(f[1], "7");
        assert_eq!(f[11], "250");
        assert_eq!(f[12], "31");
    }

    #[test]
    fn parses_status_fields() {
        let text = "Name:\tpython3\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(status_number(text, "VmRSS"), Some(12345));
        assert_eq!(status_number(text, "VmPeak"), Some(20000));
        assert_eq!(status_number(text, "VmSwap"), None);
        assert_eq!(status_number("VmRSSx: 1 kB\n", "VmRSS"), None);
        let counts = "voluntary_ctxt_switches:\t52\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(status_number(counts, "voluntary_ctxt_switches"), Some(52));
        assert_eq!(status_number(counts, "nonvoluntary_ctxt_switches"), Some(7));
    }

    #[test]
    fn reads_own_process() {
        let tree = ProcessTree::discover(std::process::id()).unwrap();
        assert!(tree.process_count() >= 1);
        assert!(tree.cpu_seconds() >= 0.0);
        assert!(own_cpu_seconds() >= 0.0);
        assert!(tree.rss_kib() > 0);
        assert!(own_rss_kib() > 0);
    }

    #[test]
    fn counts_a_thread_that_sleeps() {
        let tree = ProcessTree::discover(std::process::id()).unwrap();
        let before = tree.switches();
        // A thread of this process that sleeps three times switches out
        // at least three times of its own will.
        std::thread::spawn(|| {
            for _ in 0..3 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let after = read_switches(std::process::id()).unwrap();
            assert!(after.voluntary >= 3, "{after:?}");
        })
        .join()
        .unwrap();
        let gained = tree.switches().since(before);
        assert!(gained.voluntary >= 1, "{gained:?}");
    }
}

//! The flow log: one JSON line for every connection attempt the broker
//! decides, and one more for every accepted connection when the reaper
//! retires it, with its exact byte counts.
//!
//! Records travel through a bounded channel to a writer thread, which owns
//! the file and rotates it by size. A connect never waits for the disk: if
//! the channel is full, the attempt's record is dropped and counted
//! ([`FlowLog::dropped`], shown by `vsocketctl status` and in the metrics).
//! Close records come from the reaper, which is off the data path; it waits
//! up to [`CLOSE_PATIENCE`] per pass for room, so a burst does not cost billing
//! records, and only then drops and counts.
//!
//! A line, with keys always in this order (fields that do not apply are
//! left out; `decided_by` is on attempts only, bytes and duration on closes
//! only, `id` and `server_guest` only where there is one):
//!
//! ```text
//! {"time":"2024-02-29T12:34:56.789Z","event":"attempt","id":17,"vpc":"blue","client_guest":"a",
//!  "server_guest":"b","protocol":"tcp","client":"10.10.0.2:40312","server":"10.10.0.3:6379",
//!  "verdict":"accepted","decided_by":"allowed by default: egress allowed, security_group \"open\" ingress[0]"}
//! ```

use serde::{Serialize, Serializer};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddrV4;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vsocket_policy::FlowLogConfig;

/// Records the channel holds before attempts are dropped.
pub const CHANNEL_CAPACITY: usize = 16 * 1024;

/// How long one pass of the reaper waits, in all, for room for its close
/// records.
pub const CLOSE_PATIENCE: Duration = Duration::from_secs(1);

/// Which moment of a connection a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowEvent {
    /// The broker decided a connect.
    Attempt,
    /// An accepted connection was retired: both ends closed.
    Close,
    /// An open connection was reset because a live policy change denies it
    /// (`on_policy_change = "reset"`); its close record follows.
    Reset,
}

/// How a connect ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowVerdict {
    /// Carried over vSocket.
    Accepted,
    /// Refused at once (`ECONNREFUSED`): denied with `deny_action =
    /// "reject"`, or the listener's backlog was full.
    Rejected,
    /// Denied and silently dropped (`deny_action = "drop"`).
    Dropped,
    /// Sent to the kernel path: no vSocket listener there.
    Fallback,
    /// Reset records only: the connection was reset.
    Reset,
}

/// One line of the flow log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecord {
    #[serde(serialize_with = "serialize_time")]
    pub time: SystemTime,
    pub event: FlowEvent,
    /// The connection's id (as `vsocketctl connections` shows it); accepted
    /// connections only. Joins an attempt with its close.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub vpc: String,
    pub client_guest: String,
    /// The guest whose listener was reached; none on a fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_guest: Option<String>,
    pub protocol: &'static str,
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub verdict: FlowVerdict,
    /// The rule or default that decided (attempts), or why a policy change
    /// reset the connection (resets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Closes only: the ring totals when the connection was retired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_client_to_server: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_server_to_client: Option<u64>,
    /// Closes only: from the accept to the retirement (which follows the
    /// last close within the reaper's period, 250 ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl FlowRecord {
    /// The record as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

fn serialize_time<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*time))
}

/// `time` in RFC 3339, UTC, to the millisecond: `2024-02-29T12:34:56.789Z`.
/// Times before 1970 are shown as the epoch.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let in_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60,
        since_epoch.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The sending side of the flow log, held by the daemon.
#[derive(Debug)]
pub struct FlowLog {
    sender: SyncSender<FlowRecord>,
    dropped: Arc<AtomicU64>,
}

impl FlowLog {
    /// Opens (appends to) the log file and starts the writer thread. Fails
    /// if the file cannot be opened, so a daemon with a bad path does not
    /// start.
    pub fn open(config: &FlowLogConfig) -> io::Result<FlowLog> {
        let file = RotatingFile::open(config.clone())?;
        let (log, receiver) = FlowLog::channel(CHANNEL_CAPACITY);
        let dropped = log.dropped.clone();
        std::thread::Builder::new().name("flow-log".into()).spawn(move || write_records(&receiver, file, &dropped))?;
        Ok(log)
    }

    /// A log whose records arrive at the returned receiver.
    fn channel(capacity: usize) -> (FlowLog, Receiver<FlowRecord>) {
        let (sender, receiver) = mpsc::sync_channel(capacity);
        (FlowLog { sender, dropped: Arc::default() }, receiver)
    }

    /// Queues an attempt's record without waiting; a full channel drops it.
    pub fn record(&self, record: FlowRecord) {
        if self.sender.try_send(record).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues close records, waiting for room up to `patience` in all;
    /// after that, records that do not fit at once are dropped and counted.
    pub fn record_waiting(&self, records: Vec<FlowRecord>, patience: Duration) {
        let deadline = Instant::now() + patience;
        for mut record in records {
            loop {
                match self.sender.try_send(record) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    }

    /// Records that were not written: the channel was full, or the write
    /// failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: writes what is queued in batches, one write and
/// flush per batch, so a reader of the file sees each record promptly.
fn write_records(receiver: &Receiver<FlowRecord>, mut file: RotatingFile, dropped: &AtomicU64) {
    let mut failing = false;
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        while let Some(record) = next {
            file.push(&record.to_line());
            next = receiver.try_recv().ok();
        }
        match file.write_batch() {
            Ok(()) => failing = false,
            Err((lost, e)) => {
                dropped.fetch_add(lost, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(path = %file.config.path.display(), error = %e, "flow log: records lost");
                }
                failing = true;
            }
        }
    }
}

/// The live log file, rotated by size: before a line would take it past
/// `max_bytes`, `<path>.<keep - 1>` becomes `<path>.<keep>` (replacing the
/// oldest), and so on down to `<path>` becoming `<path>.1`.
struct RotatingFile {
    config: FlowLogConfig,
    file: File,
    /// Bytes in the live file, written or in `batch`.
    size: u64,
    batch: Vec<u8>,
    batch_lines: u64,
    /// Lines lost by a failed write or rotation since the last batch.
    lost: u64,
    error: Option<io::Error>,
}

impl RotatingFile {
    fn open(config: FlowLogConfig) -> io::Result<RotatingFile> {
        let file = Self::open_live(&config)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile { config, file, size, batch: Vec::new(), batch_lines: 0, lost: 0, error: None })
    }

    fn open_live(config: &FlowLogConfig) -> io::Result<File> {
        // Flow records name tenants' addresses: not for every local user.
        OpenOptions::new().create(true).append(true).mode(0o640).open(&config.path)
    }

    fn rotated_path(&self, k: u32) -> PathBuf {
        let mut name = OsString::from(self.config.path.as_os_str());
        name.push(format!(".{k}"));
        PathBuf::from(name)
    }

    /// Adds a line to the batch, rotating first if it would not fit.
    fn push(&mut self, line: &[u8]) {
        let len = line.len() as u64;
        if self.size > 0 && self.size + len > self.config.max_bytes {
            if let Err((lost, e)) = self.write_batch().and_then(|()| self.rotate().map_err(|e| (0, e))) {
                self.lost += lost;
                self.error = Some(e);
            }
        }
        self.batch.extend_from_slice(line);
        self.batch_lines += 1;
        self.size += len;
    }

    /// Writes the batch. On failure returns how many lines were lost (also
    /// those lost earlier in this batch) and the error.
    fn write_batch(&mut self) -> Result<(), (u64, io::Error)> {
        let result = self.file.write_all(&self.batch);
        let lines = std::mem::take(&mut self.batch_lines);
        self.batch.clear();
        let lost = std::mem::take(&mut self.lost);
        let earlier = self.error.take();
        match (result, earlier) {
            (Err(e), _) => Err((lost + lines, e)),
            (Ok(()), Some(e)) => Err((lost, e)),
            (Ok(()), None) => Ok(()),
        }
    }

    fn rotate(&mut self) -> io::Result<()> {
        for k in (1..self.config.keep).rev() {
            match std::fs::rename(self.rotated_path(k), self.rotated_path(k + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.config.path, self.rotated_path(1))?;
        self.file = Self::open_live(&self.config)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(at(951_782_400, 0)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(at(1_709_210_096, 789)), "2024-02-29T12:34:56.789Z");
        assert_eq!(rfc3339(at(1_735_689_599, 999)), "2024-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(at(4_107_542_400, 0)), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
    }

    fn attempt() -> FlowRecord {
        FlowRecord {
            time: at(1_709_210_096, 789),
            event: FlowEvent::Attempt,
            id: Some(17),
            vpc: "blue".into(),
            client_guest: "a".into(),
            server_guest: Some("b".into()),
            protocol: "tcp",
            client: "10.10.0.2:40312".parse().unwrap(),
            server: "10.10.0.3:6379".parse().unwrap(),
            verdict: FlowVerdict::Accepted,
            decided_by: Some("allowed by default: egress allowed, security_group \"open\" ingress[0]".into()),
            bytes_client_to_server: None,
            bytes_server_to_client: None,
            duration_ms: None,
        }
    }

    #[test]
    fn an_attempt_is_one_line_in_a_fixed_order() {
        let line = String::from_utf8(attempt().to_line()).unwrap();
        assert_eq!(
            line,
            "{\"time\":\"2024-02-29T12:34:56.789Z\",\"event\":\"attempt\",\"id\":17,\"vpc\":\"blue\",\
             \"client_guest\":\"a\",\"server_guest\":\"b\",\"protocol\":\"tcp\",\"client\":\"10.10.0.2:40312\",\
             \"server\":\"10.10.0.3:6379\",\"verdict\":\"accepted\",\
             \"decided_by\":\"allowed by default: egress allowed, security_group \\\"open\\\" ingress[0]\"}\n"
        );
    }

    #[test]
    fn a_close_carries_bytes_and_duration_and_fallbacks_omit_what_they_lack() {
        let close = FlowRecord {
            event: FlowEvent::Close,
            decided_by: None,
            bytes_client_to_server: Some(1 << 40),
            bytes_server_to_client: Some(0),
            duration_ms: Some(1500),
            ..attempt()
        };
        let value: serde_json::Value = serde_json::from_slice(&close.to_line()).unwrap();
        assert_eq!(value["event"], "close");
        assert_eq!(value["bytes_client_to_server"], 1u64 << 40);
        assert_eq!(value["bytes_server_to_client"], 0);
        assert_eq!(value["duration_ms"], 1500);
        assert!(value.get("decided_by").is_none());

        let fallback = FlowRecord {
            id: None,
            server_guest: None,
            verdict: FlowVerdict::Fallback,
            decided_by: Some("no vSocket listener: kernel path".into()),
            ..attempt()
        };
        let value: serde_json::Value = serde_json::from_slice(&fallback.to_line()).unwrap();
        assert_eq!(value["verdict"], "fallback");
        for absent in ["id", "server_guest", "bytes_client_to_server", "duration_ms"] {
            assert!(value.get(absent).is_none(), "{absent}");
        }
        let dropped = FlowRecord { verdict: FlowVerdict::Dropped, ..attempt() };
        assert!(String::from_utf8(dropped.to_line()).unwrap().contains("\"verdict\":\"dropped\""));
    }

    #[test]
    fn a_full_channel_drops_and_counts_instead_of_blocking() {
        let (log, receiver) = FlowLog::channel(2);
        for _ in 0..5 {
            log.record(attempt());
        }
        assert_eq!(log.dropped(), 3);
        // Close records wait, but only so long for all of them together.
        let start = Instant::now();
        log.record_waiting(vec![attempt(), attempt(), attempt()], Duration::from_millis(50));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_millis(100), "{waited:?}");
        assert_eq!(log.dropped(), 6);
        // Room again: a waiting record gets in.
        receiver.recv().unwrap();
        log.record_waiting(vec![attempt()], Duration::from_millis(50));
        assert_eq!(log.dropped(), 6);
        assert_eq!(receiver.try_iter().count(), 2);
    }

    #[test]
    fn the_file_rotates_by_size_and_keeps_the_newest() {
        let dir = std::env::temp_dir().join(format!("vsocketd-flowlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = FlowLogConfig { path: dir.join("flow.log"), max_bytes: 4096, keep: 2 };
        let mut file = RotatingFile::open(config.clone()).unwrap();
        let line_len = attempt().to_line().len() as u64;
        let per_file = 4096 / line_len;
        let total = per_file * 4 + 3;
        for i in 0..total {
            let record = FlowRecord { id: Some(i), ..attempt() };
            file.push(&record.to_line());
            if i % 7 == 0 {
                file.write_batch().unwrap();
            }
        }
        file.write_batch().unwrap();
        let ids = |name: &str| -> Vec<u64> {
            std::fs::read_to_string(dir.join(name))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
                .collect()
        };
        let (live, one, two) = (ids("flow.log"), ids("flow.log.1"), ids("flow.log.2"));
        assert!(!dir.join("flow.log.3").exists());
        assert_eq!(live, (per_file * 4..total).collect::<Vec<_>>());
        assert_eq!(one, (per_file * 3..per_file * 4).collect::<Vec<_>>());
        assert_eq!(two, (per_file * 2..per_file * 3).collect::<Vec<_>>());
        for name in ["flow.log", "flow.log.1", "flow.log.2"] {
            assert!(std::fs::metadata(dir.join(name)).unwrap().len() <= 4096, "{name}");
        }
        // Reopening appends to the live file.
        drop(file);
        let mut file = RotatingFile::open(config).unwrap();
        assert_eq!(file.size, 3 * line_len);
        file.push(&FlowRecord { id: Some(999), ..attempt() }.to_line());
        file.write_batch().unwrap();
        assert_eq!(ids("flow.log").last(), Some(&999));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

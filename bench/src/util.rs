//! Shared pieces of the benchmark driver: child servers, memory readings,
//! percentiles and the result table.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// The release binaries the driver starts, next to its own executable.
pub fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    me.with_file_name(name)
}

/// The service's release binary (built by scripts/bench into target/release).
pub fn changetoken_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/changetoken")
}

/// A server in a child process.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines the server wrote to stderr after it started listening.
    pub log: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Server {
    /// Starts `changetoken serve` on a free port over `data_dir` with `extra` flags.
    pub async fn changetoken(data_dir: &Path, extra: &[&str]) -> Server {
        let mut command = Command::new(changetoken_bin());
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(data_dir)
            .args(extra)
            .env("CHANGETOKEN_LOG", "info");
        Self::spawn(command).await
    }

    /// Starts the echo server on a free port.
    pub async fn echo() -> Server {
        let mut command = Command::new(sibling("echo"));
        command.args(["127.0.0.1:0"]);
        Self::spawn(command).await
    }

    /// Spawns `command`, which must print a JSON log line containing
    /// `"listening"` and `"addr":"IP:PORT"` on stderr.
    pub async fn spawn(mut command: Command) -> Server {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn server");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("stderr") {
                if line.contains("listening") {
                    let start = line.find("\"addr\":\"").expect("addr") + 8;
                    let end = start + line[start..].find('"').expect("addr end");
                    return line[start..end].parse().expect("socket address");
                }
            }
            panic!("server exited before listening");
        })
        .await
        .expect("server did not listen within 30 s");
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        Server { child, addr, log }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// SIGTERMs the server and returns every line it logged up to its exit,
    /// waiting until its stderr closed so that the last lines (the request
    /// counts) are not lost.
    pub async fn stop(mut self) -> Vec<String> {
        let pid = self.pid().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            eprintln!("server {pid} did not exit within 30 s of SIGTERM; killing it");
            let _ = self.child.kill().await;
        }
        let mut lines = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.log.recv()).await
        {
            lines.push(line);
        }
        lines
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The `p`th percentile (0..=100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank]
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    percentile(&mut v, 50.0)
}

/// One row of the result table.
pub struct Row {
    pub workload: String,
    pub metric: String,
    pub changetoken: String,
    pub anchor: String,
    pub ratio: String,
    pub goal: String,
}

impl Row {
    pub fn new(
        workload: &str,
        metric: &str,
        ours: String,
        anchor: String,
        ratio: String,
        goal: &str,
    ) -> Row {
        Row {
            workload: workload.into(),
            metric: metric.into(),
            changetoken: ours,
            anchor,
            ratio,
            goal: goal.into(),
        }
    }
}

/// Prints the rows as a Markdown table.
pub fn print_table(rows: &[Row]) {
    println!("| workload | metric | changetoken | anchor | ratio | goal |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.workload, r.metric, r.changetoken, r.anchor, r.ratio, r.goal
        );
    }
}

/// The number `field` in the server's `"requests served"` log line.
pub fn served(lines: &[String], field: &str) -> Option<u64> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("\"requests served\""))?;
    let key = format!("\"{field}\":");
    let start = line.find(&key)? + key.len();
    let digits: String = line[start..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A directory under the system's temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "changetoken-bench-{label}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory for one workload's data, named after this process;
/// the workload removes it when done.
pub fn scratch_dir(label: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("changetoken-bench-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A connected channel to `endpoint`.
pub async fn connect(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect")
}

/// A row that reports a failed check of `workload` loudly.
pub fn failed_row(workload: &str, problem: &str) -> Row {
    Row::new(
        workload,
        "**CHECK FAILED**",
        problem.replace('|', "/"),
        String::new(),
        String::new(),
        "",
    )
}

//! One TorchServe Python backend worker process: started as TorchServe starts it
//! (`python <ts>/model_service_worker.py --sock-type unix --sock-name <dir>/.ts.sock.N
//! --metrics-config <ts>/configs/metrics.yaml`, working directory and `PYTHONPATH` = the
//! unpacked archive), connected over its Unix socket, told to load the model, then sent
//! inference batches. Its output goes to our log (and the last lines into load errors). The
//! process is killed when the [`Worker`] is dropped; if the server itself is killed, the
//! worker's socket closes and the worker exits on its own (TorchServe's worker exits when its
//! frontend disconnects), so a worker never outlives what owns it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::protocol::{self, Message, ReadError};

/// Where TorchServe's worker code is, for one Python interpreter.
#[derive(Debug, Clone)]
pub struct WorkerCode {
    pub python: PathBuf,
    /// `<site-packages>/ts/model_service_worker.py`.
    pub script: PathBuf,
    /// `<site-packages>/ts/configs/metrics.yaml`.
    pub metrics_config: PathBuf,
}

impl WorkerCode {
    /// Asks the interpreter where its `ts` package is (TorchServe's frontend runs the worker
    /// script of the `ts` package it was installed with; we run the one the Python has).
    pub fn locate(python: &Path) -> Result<WorkerCode, String> {
        let out = Command::new(python)
            .args([
                "-c",
                "import os, ts; print(os.path.dirname(os.path.abspath(ts.__file__)))",
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run the Python interpreter '{}': {e}", python.display()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let last = stderr.lines().last().unwrap_or("").trim();
            return Err(format!(
                "the Python interpreter '{}' cannot import TorchServe's worker package `ts` ({last}); \
                 install it with `pip install torchserve==0.12.0` in that environment, or point \
                 --torchserve-python / the python key of config.properties at one that has it",
                python.display()
            ));
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let code = WorkerCode {
            python: python.to_path_buf(),
            script: dir.join("model_service_worker.py"),
            metrics_config: dir.join("configs").join("metrics.yaml"),
        };
        if !code.script.is_file() {
            return Err(format!(
                "TorchServe's worker script is missing: {}",
                code.script.display()
            ));
        }
        Ok(code)
    }
}

/// What a worker loads and how long it may take.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub model_name: String,
    /// The unpacked archive.
    pub model_dir: PathBuf,
    pub handler: String,
    pub envelope: String,
    pub batch_size: u32,
    /// Extra `PYTHONPATH` entries before the inherited one (an archive's installed
    /// requirements).
    pub python_path: Vec<PathBuf>,
    pub startup_timeout: Duration,
    pub response_timeout: Duration,
    /// The largest field a worker's answer may carry (TorchServe's `max_response_size`).
    pub max_response_bytes: usize,
}

/// Why a worker could not serve.
#[derive(Debug)]
pub enum WorkerError {
    /// It could not be started, or its load failed (with the worker's own message).
    Start(String),
    /// It died, hung past the response timeout, or broke the protocol while answering.
    Lost(String),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::Start(m) | WorkerError::Lost(m) => f.write_str(m),
        }
    }
}

static NEXT_SOCKET: AtomicU64 = AtomicU64::new(9000);

/// The last lines a worker printed, for error messages.
type Tail = Arc<Mutex<VecDeque<String>>>;
const TAIL_LINES: usize = 200;

/// The longest path a Unix socket can have (`sun_path` holds 108 bytes with the final NUL).
const UNIX_PATH_MAX: usize = 107;

/// Where the worker's socket directory goes: the temporary directory (TMPDIR, as TorchServe
/// puts its sockets), or `/tmp` when TMPDIR is so long that the socket's path would not fit
/// in a Unix socket address (the worker would fail with "AF_UNIX path too long").
fn socket_parent() -> PathBuf {
    // "/oxserve-ts-worker-XXXXXX/.ts.sock." and up to 20 digits.
    const SUFFIX: usize = "/oxserve-ts-worker-XXXXXX/.ts.sock.".len() + 20;
    let tmp = std::env::temp_dir();
    if tmp.as_os_str().len() + SUFFIX <= UNIX_PATH_MAX {
        tmp
    } else {
        PathBuf::from("/tmp")
    }
}

pub struct Worker {
    child: Child,
    stream: UnixStream,
    tail: Tail,
    spec: WorkerSpec,
    /// Holds the socket file.
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts a worker, connects to it and loads the model; errors carry the worker's output.
    pub fn start(code: &WorkerCode, spec: &WorkerSpec) -> Result<Worker, WorkerError> {
        let dir = tempfile::Builder::new()
            .prefix("oxserve-ts-worker-")
            .tempdir_in(socket_parent())
            .map_err(|e| WorkerError::Start(format!("cannot create the worker's socket directory: {e}")))?;
        // The worker takes the number after the last dot as a port (it adds its rank to it).
        let socket = dir.path().join(format!(
            ".ts.sock.{}",
            NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
        ));
        let mut python_path: Vec<PathBuf> = vec![spec.model_dir.clone()];
        python_path.extend(spec.python_path.iter().cloned());
        if let Some(inherited) = std::env::var_os("PYTHONPATH") {
            python_path.extend(std::env::split_paths(&inherited));
        }
        let python_path = std::env::join_paths(python_path)
            .map_err(|e| WorkerError::Start(format!("invalid PYTHONPATH: {e}")))?;
        let mut command = Command::new(&code.python);
        command
            .arg(&code.script)
            .arg("--sock-type")
            .arg("unix")
            .arg("--sock-name")
            .arg(&socket)
            .arg("--metrics-config")
            .arg(&code.metrics_config)
            .current_dir(&spec.model_dir)
            .env("PYTHONPATH", python_path)
            // Unbuffered, so the worker's log lines reach us as it writes them.
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| WorkerError::Start(format!("cannot start '{}': {e}", code.python.display())))?;
        let tail: Tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            forward_output(out, spec.model_name.clone(), pid, tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_output(err, spec.model_name.clone(), pid, tail.clone());
        }
        let stream = match connect(&mut child, &socket, spec.startup_timeout) {
            Ok(s) => s,
            Err(why) => {
                kill(&mut child);
                return Err(WorkerError::Start(with_tail(why, &tail)));
            }
        };
        let mut worker = Worker {
            child,
            stream,
            tail,
            spec: spec.clone(),
            _dir: dir,
        };
        worker.load()?;
        Ok(worker)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn load(&mut self) -> Result<(), WorkerError> {
        let msg = protocol::load_message(
            &self.spec.model_name,
            &self.spec.model_dir.to_string_lossy(),
            self.spec.batch_size,
            &self.spec.handler,
            &self.spec.envelope,
        );
        let timeout = self.spec.startup_timeout;
        let answer = self.exchange(&msg, timeout).map_err(|e| {
            WorkerError::Start(with_tail(
                format!("the worker failed while loading the model: {e}"),
                &self.tail,
            ))
        })?;
        if answer.code != 200 {
            return Err(WorkerError::Start(with_tail(
                format!(
                    "the worker could not load the model: {} - {}",
                    answer.code, answer.message
                ),
                &self.tail,
            )));
        }
        Ok(())
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends one inference message and reads the answers until every request has its final
    /// one (streamed answers come in several messages; their payloads are concatenated).
    pub fn infer(&mut self, message: &[u8], requests: usize) -> Result<Vec<Message>, WorkerError> {
        let deadline = Instant::now() + self.spec.response_timeout;
        self.stream
            .write_all(message)
            .map_err(|e| self.lost(&format!("cannot send the request to the worker: {e}")))?;
        let mut messages = Vec::new();
        let mut finished = 0usize;
        while finished < requests {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| self.lost(&e.to_string()))?;
            let answer = match protocol::read_message(&mut self.stream, self.spec.max_response_bytes) {
                Ok(a) => a,
                Err(ReadError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timed_out());
                }
                Err(ReadError::Io(_)) => return Err(self.died()),
                Err(ReadError::Protocol(m)) => {
                    return Err(self.lost(&format!("invalid answer from the worker: {m}")));
                }
            };
            if answer.code != 200 || answer.predictions.is_empty() {
                // The whole batch failed (the handler raised): every request has its answer.
                finished = requests;
            } else {
                finished += answer.predictions.iter().filter(|p| !p.continues()).count();
            }
            messages.push(answer);
        }
        Ok(messages)
    }

    fn exchange(&mut self, message: &[u8], timeout: Duration) -> Result<Message, String> {
        self.stream.write_all(message).map_err(|e| e.to_string())?;
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        protocol::read_message(&mut self.stream, self.spec.max_response_bytes).map_err(|e| match e {
            ReadError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                format!("no answer within {} s", timeout.as_secs())
            }
            ReadError::Io(_) => "the worker exited".to_string(),
            ReadError::Protocol(m) => m,
        })
    }

    fn died(&mut self) -> WorkerError {
        // Give the process a moment to be reaped so its exit status is in the message.
        let deadline = Instant::now() + Duration::from_millis(500);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => break None,
            }
        };
        let how = status.map_or_else(|| "its connection closed".to_string(), |s| s.to_string());
        tracing::warn!(model = %self.spec.model_name, pid = self.child.id(), %how, "TorchServe worker died");
        // TorchServe's words for it, which clients see.
        WorkerError::Lost("Worker died.".to_string())
    }

    fn timed_out(&mut self) -> WorkerError {
        tracing::warn!(model = %self.spec.model_name, pid = self.child.id(),
            "TorchServe worker did not answer within the response timeout; stopping it");
        kill(&mut self.child);
        WorkerError::Lost(format!(
            "Worker did not respond in the response timeout ({} s)",
            self.spec.response_timeout.as_secs()
        ))
    }

    fn lost(&mut self, why: &str) -> WorkerError {
        kill(&mut self.child);
        WorkerError::Lost(why.to_string())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Connects to the worker's socket once it listens; fails when the worker exits first or the
/// start-up timeout passes.
fn connect(child: &mut Child, socket: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return Ok(stream);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the worker exited before it listened ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the worker did not listen within {} s",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Logs a worker's output line by line (TorchServe's model_log) and keeps the last lines.
fn forward_output(out: impl Read + Send + 'static, model: String, pid: u32, tail: Tail) {
    let spawned = std::thread::Builder::new()
        .name(format!("ts-worker-{pid}-log"))
        .spawn(move || {
            let mut reader = BufReader::new(out);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                // Bytes, not `lines()`: output that is not UTF-8 must not stop the reading (the
                // worker would block on a full pipe).
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                // The worker reports its own metrics as log lines; they are not errors.
                if line.starts_with("[METRICS]") {
                    tracing::debug!(target: "oxserve::torchserve::worker", %model, pid, "{line}");
                } else {
                    tracing::info!(target: "oxserve::torchserve::worker", %model, pid, "{line}");
                }
                let mut t = tail.lock();
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(%e, "cannot start the thread that reads a worker's output");
    }
}

/// A message with what the worker printed about the failure: the exception lines of its
/// tracebacks (`ModuleNotFoundError: No module named 'x'`; TorchServe's loader retries a failed
/// import under another name, so the first exception is the telling one), else its last lines.
fn with_tail(why: String, tail: &Tail) -> String {
    // The output threads may still be reading the last lines.
    std::thread::sleep(Duration::from_millis(100));
    let lines: Vec<String> = tail.lock().iter().cloned().collect();
    let mut exceptions: Vec<&str> = Vec::new();
    for line in lines.iter().map(|l| l.trim()) {
        if is_exception_line(line) && !exceptions.contains(&line) {
            exceptions.push(line);
        }
    }
    let excerpt: Vec<&str> = if exceptions.is_empty() {
        let start = lines.len().saturating_sub(5);
        lines[start..]
            .iter()
            .map(String::as_str)
            .filter(|l| !l.starts_with("[METRICS]"))
            .collect()
    } else {
        exceptions.into_iter().take(5).collect()
    };
    if excerpt.is_empty() {
        why
    } else {
        format!("{why}; worker output: {}", excerpt.join(" | "))
    }
}

/// `SomeError: message` or `package.module.SomeException: message`, as Python prints the last
/// line of a traceback.
fn is_exception_line(line: &str) -> bool {
    let Some((name, _)) = line.split_once(": ") else {
        return false;
    };
    !name.is_empty()
        && (name.ends_with("Error") || name.ends_with("Exception") || name.ends_with("Exit"))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

#[cfg(test)]
mod tests {
    #[test]
    fn exception_lines_are_recognised() {
        assert!(super::is_exception_line(
            "ModuleNotFoundError: No module named 'oxdep_probe'"
        ));
        assert!(super::is_exception_line("ts.utils.util.PredictionException: bad"));
        assert!(!super::is_exception_line("Backend worker process died."));
        assert!(!super::is_exception_line(
            "  File \"x.py\", line 3, in <module>: Error"
        ));
        assert!(!super::is_exception_line("[METRICS]HandlerTime.Milliseconds: 1"));
    }
}

//! Running commands: `ip`, CNI plugins and test processes, always with a deadline.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Deadline for one `ip` invocation; they take milliseconds, so hitting this means the kernel
/// or the machine is in trouble.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `ip ARGS` and returns its stdout; the error carries the command and its stderr.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, None, IP_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command line of `cmd`, for error messages and log headers.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with `stdin` fed to it, killing it when `timeout` passes.
/// Stdout and stderr are collected on their own threads so a chatty child never blocks on a
/// full pipe while we wait.
pub(crate) fn run_with_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output> {
    // Its own process group: Ctrl-C in a terminal, `timeout` and test runners signal a whole
    // group, and the teardown that signal triggers must not lose its own `ip` commands.
    cmd.process_group(0);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A child that exits without reading its stdin closes the pipe; that is its
            // business and shows up in its exit status, so the write error is dropped.
            Some(thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_reader(child.stdout.take(), 0, tx.clone());
    spawn_reader(child.stderr.take(), 1, tx);
    // The command leads its own process group: a deadline kills the whole group, so no
    // helper it started survives it.
    let group = child.id();
    let status = match wait_deadline(&mut child, timeout)? {
        Some(status) => status,
        None => {
            signal_group(group, Signal::SIGKILL);
            let _ = child.wait();
            bail!("`{}` did not finish within {timeout:?}", describe(cmd));
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    // The pipes close when every holder exits; a leftover helper holding them is killed
    // after a grace period instead of hanging the test.
    let mut outputs = [Vec::new(), Vec::new()];
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let (which, data) = match rx.recv_timeout(left) {
            Ok(r) => r,
            Err(_) => {
                signal_group(group, Signal::SIGKILL);
                rx.recv_timeout(Duration::from_secs(5))
                    .context("output pipes still open after killing the process group")?
            }
        };
        outputs[which] = data;
    }
    let [stdout, stderr] = outputs;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn spawn_reader<R: Read + Send + 'static>(
    pipe: Option<R>,
    which: usize,
    done: std::sync::mpsc::Sender<(usize, Vec<u8>)>,
) {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        let _ = done.send((which, buf));
    });
}

/// Sends `sig` to the process group `pgid`, ignoring one that is gone.
fn signal_group(pgid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pgid) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(raw), sig);
    }
}

/// Waits for `child` until `timeout`; `None` when it is still running then.
pub(crate) fn wait_deadline(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

/// A process started by the cluster inside one of its network namespaces, its stdout and
/// stderr going to a file in the test's log folder.
///
/// Dropping a `Proc` kills the process; the cluster's teardown kills it too, so a leaked
/// handle never leaves a process behind.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let mut file = File::create(&log)
            .with_context(|| format!("cannot create log file {}", log.display()))?;
        writeln!(file, "$ {}", describe(&cmd))?;
        let err = file.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", describe(&cmd)))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (of the command itself: `ip netns exec` execs into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the process's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the output contains `needle`; fails early if the process exits first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                if self.output().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({status}) before printing {needle:?}; its output:\n{}",
                    self.name,
                    tail(&self.output(), 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; its output:\n{}",
                    self.name,
                    tail(&self.output(), 40)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match wait_deadline(&mut self.child, timeout)? {
            Some(s) => Ok(s),
            None => bail!("{} still running after {timeout:?}", self.name),
        }
    }

    /// Asks the process to stop (SIGTERM), then kills it if it is still there after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        signal(self.pid(), Signal::SIGTERM);
        if let Some(s) = wait_deadline(&mut self.child, grace)? {
            return Ok(s);
        }
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Appends to a log file, creating it.
pub(crate) fn append_log(path: &Path, text: &str) -> Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

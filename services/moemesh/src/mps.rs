//! CUDA MPS for `moemesh up`: processes that share a GPU (the gate and its expert workers on one
//! card) otherwise time-slice it, one context at a time, and a device-ordered expert call then
//! waits for a context switch each way. Under an MPS daemon their kernels run side by side:
//! on one H100 the mesh went from 42% of in-process decode speed at batch 1 to 95%, and from 67%
//! to 107% at batch 64 (docs/BENCHMARKS.md). `up` starts a private daemon (its own pipe and log
//! directories, mode 0700, removed at exit) when processes share a GPU and
//! `nvidia-cuda-mps-control` is on the PATH (`--mps auto`, the default), and stops it when the
//! mesh stops. A daemon already named by `CUDA_MPS_PIPE_DIRECTORY` is used as it is.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// The control program MPS is driven by.
pub const CONTROL: &str = "nvidia-cuda-mps-control";

/// `up --mps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MpsMode {
    /// A private daemon when processes share a GPU and the control program is installed.
    Auto,
    /// A private daemon whenever the mesh runs on CUDA (an error without the control program).
    On,
    /// No daemon: processes on one GPU time-slice it.
    Off,
}

/// Whether two of the mesh's processes, on `devices`, share a GPU.
pub fn shares_gpu(devices: &[String]) -> bool {
    let mut seen = std::collections::HashSet::new();
    devices.iter().filter(|d| d.starts_with("cuda")).any(|d| {
        !seen.insert(if d.as_str() == "cuda" {
            "cuda:0"
        } else {
            d.as_str()
        })
    })
}

/// What `up` does about MPS: `Ok(true)` start a private daemon, `Ok(false)` not (with the
/// reason, for the log), `Err` a refusal (`--mps on` that cannot be honoured).
pub fn decide(
    mode: MpsMode,
    on_cuda: bool,
    shares: bool,
    control_found: bool,
    external: bool,
) -> anyhow::Result<(bool, &'static str)> {
    if external {
        return Ok((false, "CUDA_MPS_PIPE_DIRECTORY is set: using that daemon"));
    }
    match mode {
        MpsMode::Off => Ok((false, "--mps off")),
        _ if !on_cuda => Ok((false, "the mesh runs on the CPU")),
        MpsMode::On if !control_found => {
            bail!("--mps on: {CONTROL} is not on the PATH (it comes with the NVIDIA driver)")
        }
        MpsMode::On => Ok((true, "--mps on")),
        MpsMode::Auto if !shares => Ok((false, "no GPU is shared by two processes")),
        MpsMode::Auto if !control_found => Ok((
            false,
            "nvidia-cuda-mps-control is not on the PATH; processes sharing a GPU will time-slice it",
        )),
        MpsMode::Auto => Ok((true, "processes share a GPU")),
    }
}

/// `name` on the PATH, if it is there.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A private MPS control daemon, stopped (`quit`) on drop.
pub struct MpsDaemon {
    control: PathBuf,
    dir: tempfile::TempDir,
}

impl MpsDaemon {
    pub fn start(control: &Path) -> anyhow::Result<Self> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("moemesh-up-mps-");
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let dir = builder
            .tempdir()
            .context("creating the MPS pipe directory")?;
        let daemon = MpsDaemon {
            control: control.to_path_buf(),
            dir,
        };
        std::fs::create_dir_all(daemon.log_dir()).context("creating the MPS log directory")?;
        // `-d` forks the daemon and returns once it is listening on the pipe directory.
        let status = Command::new(&daemon.control)
            .arg("-d")
            .envs(daemon.env())
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("starting {}", daemon.control.display()))?;
        if !status.success() {
            bail!("{CONTROL} -d failed ({status})");
        }
        Ok(daemon)
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    /// The variables that put a CUDA process under this daemon.
    pub fn env(&self) -> Vec<(String, PathBuf)> {
        vec![
            (
                "CUDA_MPS_PIPE_DIRECTORY".into(),
                self.dir.path().to_path_buf(),
            ),
            ("CUDA_MPS_LOG_DIRECTORY".into(), self.log_dir()),
        ]
    }

    pub fn pipe_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MpsDaemon {
    fn drop(&mut self) {
        let quit = Command::new(&self.control)
            .envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    use std::io::Write;
                    let _ = stdin.write_all(b"quit\n");
                }
                child.wait()
            });
        if let Err(e) = quit {
            eprintln!("moemesh up: stopping the MPS daemon: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_is_shared_when_two_processes_land_on_it() {
        let shares = |v: &[&str]| shares_gpu(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // Gate and workers on cuda:0.
        assert!(shares(&["cuda:0", "cuda:0", "cuda:0"]));
        // `cuda` is `cuda:0`.
        assert!(shares(&["cuda", "cuda:0"]));
        // One process per GPU: nothing shared.
        assert!(!shares(&["cuda:0", "cuda:1", "cuda:2", "cuda:3"]));
        // Two gates, two workers on four GPUs, then a third worker on cuda:2.
        assert!(shares(&["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:2"]));
        // The CPU is never a shared GPU.
        assert!(!shares(&["cpu", "cpu", "cpu"]));
    }

    #[test]
    fn auto_starts_a_daemon_only_for_a_shared_gpu_with_the_control_program() {
        use MpsMode::*;
        let start = |m, cuda, shares, found, ext| decide(m, cuda, shares, found, ext).map(|d| d.0);
        assert!(start(Auto, true, true, true, false).expect("decides"));
        assert!(!start(Auto, true, false, true, false).expect("decides"));
        assert!(!start(Auto, true, true, false, false).expect("decides"));
        assert!(!start(Auto, false, true, true, false).expect("decides"));
        assert!(!start(Off, true, true, true, false).expect("decides"));
        assert!(start(On, true, false, true, false).expect("decides"));
        let refused = decide(On, true, true, false, false).expect_err("no control program");
        assert!(refused.to_string().contains(CONTROL), "{refused}");
        // A daemon someone else runs is used as it is, whatever the mode.
        for m in [Auto, On, Off] {
            assert!(!start(m, true, true, true, true).expect("decides"));
        }
    }
}

//! The signals that stop `outrun serve`: SIGINT, SIGTERM, SIGHUP and SIGQUIT
//! all mean the same graceful shutdown (stop claiming, release what has not
//! started, give running handlers `shutdown_grace`, release the rest), so no
//! catchable signal leaves a lease behind.
//!
//! Why SIGHUP stops rather than reloads: handler modules already reload by
//! themselves when their files change, and everything else in the config
//! (database, concurrency, grants, bindings) needs a new process to change
//! safely. A SIGHUP also arrives when the terminal `serve` runs in closes,
//! where stopping is what the default action did too, minus the leases it
//! used to leave held until they expired. A process started with SIGHUP
//! ignored (`nohup outrun serve`) keeps ignoring it.
//!
//! SIGQUIT, whose default is to dump core, stops gracefully as well. After
//! the first signal, further ones are logged and change nothing: shutdown
//! is already under way and takes at most `shutdown_grace`; SIGKILL is the
//! way to stop at once (its leases then expire after `lease_duration`).

use tokio::sync::mpsc;

/// Listens for the stop signals from the moment it is created (the
/// handlers are installed at once, so a signal during start-up, while the
/// handlers compile, is caught too).
pub struct StopSignals {
    rx: mpsc::UnboundedReceiver<&'static str>,
}

impl StopSignals {
    pub fn listen() -> anyhow::Result<StopSignals> {
        let (tx, rx) = mpsc::unbounded_channel();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let kinds = [
                (SignalKind::interrupt(), "SIGINT"),
                (SignalKind::terminate(), "SIGTERM"),
                (SignalKind::hangup(), "SIGHUP"),
                (SignalKind::quit(), "SIGQUIT"),
            ];
            for (kind, name) in kinds {
                if name == "SIGHUP" && ignored_at_start(libc::SIGHUP) {
                    tracing::info!("SIGHUP is ignored (nohup); it will not stop outrun");
                    continue;
                }
                let mut s = signal(kind)
                    .map_err(|e| anyhow::anyhow!("cannot install a handler for {name}: {e}"))?;
                let tx = tx.clone();
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        if tx.send(name).is_err() {
                            return;
                        }
                    }
                });
            }
        }
        #[cfg(not(unix))]
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                while tokio::signal::ctrl_c().await.is_ok() {
                    if tx.send("Ctrl-C").is_err() {
                        return;
                    }
                }
            });
        }
        Ok(StopSignals { rx })
    }

    /// The next stop signal's name.
    pub async fn recv(&mut self) -> &'static str {
        match self.rx.recv().await {
            Some(name) => name,
            // Every listener failed: never resolve rather than stop.
            None => std::future::pending().await,
        }
    }

    /// Wait for the first signal and log it; later ones are logged as
    /// changing nothing.
    pub async fn first(mut self) {
        let name = self.recv().await;
        tracing::info!(
            signal = name,
            "{name} received: shutting down gracefully (no new claims; running handlers get shutdown_grace)"
        );
        tokio::spawn(async move {
            loop {
                let again = self.recv().await;
                tracing::warn!(
                    signal = again,
                    "{again} received while shutting down: already stopping within shutdown_grace; SIGKILL stops at once but leaves leases until they expire"
                );
            }
        });
    }
}

/// Whether `sig` was set to be ignored when the process started (as `nohup`
/// does for SIGHUP); installing a handler would undo that.
#[cfg(unix)]
fn ignored_at_start(sig: libc::c_int) -> bool {
    // SAFETY: sigaction with a null new action only reads the current
    // disposition into `old`, which is a plain C struct we own.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

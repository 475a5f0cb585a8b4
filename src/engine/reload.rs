//! Models change without a restart: a model folder added to, replaced in or removed from
//! `--models-dir` is picked up while the server runs.
//!
//! One task owns the watching, so reloads never overlap. Every `--reload-poll-ms` it takes the
//! folders' fingerprints ([`registry::scan`]); a change is acted on once two polls in a row
//! agree, so a model still being copied in is not loaded half-written; a folder whose files
//! changed only in their times (`touch`) is compared by content and not reloaded. SIGHUP acts at
//! once, settled or not, and compares every folder's contents, so a replacement that kept the
//! files' sizes and times (`rsync -a`, `tar`) is seen too. The new version is loaded and warmed
//! up beside the old one on a blocking thread, then the registry is swapped whole: a request
//! holds the model it started with (its `Arc`, and with it the old worker thread) until it is
//! answered, so nothing in flight fails, and readiness never drops. A folder that fails to load leaves its old version serving; the
//! failure is logged with what to fix, listed by `GET /v1/models` and counted in
//! `qscore_model_reloads_total` and `qscore_model_load_failing`.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::{
    Engine,
    registry::{self, Fingerprint, Reloaded},
};

impl Engine {
    /// Watches the models folder for as long as the runtime runs: polls every `poll` (`None`:
    /// only on SIGHUP). Does nothing for an engine over models built elsewhere.
    pub fn watch_models(engine: Arc<Self>, poll: Option<Duration>) {
        if engine.loader.is_none() {
            return;
        }
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP ({e}); model folders are reloaded by polling only");
                None
            }
        };
        tokio::spawn(async move {
            let mut tick = poll.map(tokio::time::interval);
            if let Some(t) = tick.as_mut() {
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            // The previous poll's scan (settling), and the last scan handed to a reload.
            let (mut previous, mut acted): (Option<Folders>, Option<Folders>) = (None, None);
            // Said once, not at every poll, while the models folder cannot be read.
            let mut unreadable: Option<String> = None;
            loop {
                let forced = tokio::select! {
                    () = next_poll(tick.as_mut()) => false,
                    Some(()) = next_hangup(hangup.as_mut()) => true,
                };
                let e = Arc::clone(&engine);
                let now = match tokio::task::spawn_blocking(move || e.scan_models()).await {
                    Ok(Some(Ok(now))) => now,
                    Ok(Some(Err(err))) => {
                        let err = format!("{err:#}");
                        if unreadable.as_ref() != Some(&err) {
                            tracing::warn!("cannot scan the models folder: {err}; the models served stay as they are");
                        }
                        unreadable = Some(err);
                        continue;
                    }
                    Ok(None) | Err(_) => continue,
                };
                unreadable = None;
                let settled = forced || previous.as_ref() == Some(&now);
                previous = Some(now.clone());
                if !settled || (!forced && acted.as_ref() == Some(&now)) {
                    continue;
                }
                acted = Some(now.clone());
                let e = Arc::clone(&engine);
                match tokio::task::spawn_blocking(move || e.reload(&now, forced)).await {
                    Ok(done) if done.changed() || forced => tracing::info!(
                        loaded = ?done.loaded,
                        failed = ?done.failed,
                        removed = ?done.removed,
                        forgotten = ?done.forgotten,
                        restored = ?done.restored,
                        trigger = if forced { "SIGHUP" } else { "poll" },
                        "model folders reloaded"
                    ),
                    Ok(_) => {}
                    Err(err) => tracing::error!("the model reload task failed: {err}"),
                }
            }
        });
    }

    fn scan_models(&self) -> Option<anyhow::Result<Folders>> {
        Some(registry::scan(self.loader.as_ref()?.models_dir()))
    }

    /// Loads what changed in `folders` and swaps the new registry in. Blocking. Only the
    /// watching task calls it, so two reloads never race.
    fn reload(&self, folders: &Folders, recheck: bool) -> Reloaded {
        let Some(loader) = &self.loader else { return Reloaded::default() };
        let current = self.registry();
        let (next, done) = loader.reload(&current, folders, recheck);
        if let Some(next) = next {
            for name in done.loaded.iter().chain(&done.removed) {
                let calibration = next.get(Some(name)).ok();
                self.drift.reset(name, calibration.as_ref().and_then(|m| m.calibration.as_ref()));
            }
            self.registry.store(Arc::new(next));
        }
        done
    }
}

type Folders = BTreeMap<String, Fingerprint>;

/// The next poll; never, when polling is off.
async fn next_poll(tick: Option<&mut tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The next SIGHUP; never, when it cannot be listened for.
async fn next_hangup(hangup: Option<&mut tokio::signal::unix::Signal>) -> Option<()> {
    match hangup {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

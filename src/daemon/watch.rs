//! Reload on changed files: the settings file and every rule file it names are polled
//! (modification time, size, inode) every `watch_interval_ms`; a change that then holds
//! still for [`DEBOUNCE`] triggers one reload. Polling instead of inotify keeps it simple
//! and also catches editors that replace files by rename, rule files appearing under a glob,
//! and files on any file system; half a second of delay is fine for a rule change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Shared;
use crate::settings::Settings;

/// Quiet time after a change before reloading (editors write in several steps).
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// The watched files and what they looked like (None: missing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint(pub Vec<(PathBuf, Option<Stamp>)>);

/// Modification time, size, inode.
pub type Stamp = (SystemTime, u64, u64);

fn stat(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The settings file and, when it loads, the rule files it names. Blocking (file system).
pub fn fingerprint(config: &Path) -> Fingerprint {
    let mut files = vec![config.to_path_buf()];
    if let Ok(s) = Settings::load(config)
        && let Ok(rules) = s.rule_files()
    {
        files.extend(rules);
    }
    Fingerprint(files.into_iter().map(|p| (p.clone(), stat(&p))).collect())
}

/// Poll forever; reload when the files differ from those of the last (re)load.
pub async fn run(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = current(&shared).await;
        if now == shared.state().fingerprint {
            continue;
        }
        // debounce: wait until the files stop changing
        let mut last = now;
        loop {
            tokio::time::sleep(DEBOUNCE).await;
            let again = current(&shared).await;
            if again == last {
                break;
            }
            last = again;
        }
        if last == shared.state().fingerprint {
            continue; // a reload from elsewhere picked it up meanwhile
        }
        tracing::info!("rule or settings file changed: reloading");
        super::reload(&shared, "file").await;
    }
}

async fn current(shared: &Arc<Shared>) -> Fingerprint {
    let config = shared.config.clone();
    tokio::task::spawn_blocking(move || fingerprint(&config))
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_rule_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("brdivert.toml");
        std::fs::create_dir(dir.path().join("rules.d")).unwrap();
        std::fs::write(
            &cfg,
            "rules = [\"rules.d/*.toml\"]\n[bridge]\nports = [\"a\"]\n",
        )
        .unwrap();
        let a = fingerprint(&cfg);
        assert_eq!(a.0.len(), 1);
        std::fs::write(dir.path().join("rules.d/x.toml"), "").unwrap();
        let b = fingerprint(&cfg);
        assert_eq!(b.0.len(), 2);
        assert_ne!(a, b);
        std::fs::write(dir.path().join("rules.d/x.toml"), "# changed\n").unwrap();
        assert_ne!(fingerprint(&cfg), b);
    }
}

//! Health checks of diverting rules' targets: a tokio task per rule with a `health` table,
//! TCP connects every `interval` (each bounded by `timeout`), and a fall/rise state machine.
//! A transition is reported to a [`HealthSink`]; the daemon's sink logs it, counts it in the
//! metrics and flips the kernel's behaviour for new flows (see `daemon::mod`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::policy::Health;

/// Up/down with fall/rise hysteresis. Starts up: the rules are installed diverting, and a
/// target that is down is found within `fall` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Machine {
    pub up: bool,
    /// Consecutive results against the current state.
    streak: u32,
    fall: u32,
    rise: u32,
}

impl Machine {
    pub fn new(fall: u32, rise: u32) -> Machine {
        Machine::starting(fall, rise, true)
    }

    /// Start in a known state (a checker restarted with new parameters keeps its target's
    /// state, so the kernel and the machine agree).
    pub fn starting(fall: u32, rise: u32, up: bool) -> Machine {
        Machine {
            up,
            streak: 0,
            fall: fall.max(1),
            rise: rise.max(1),
        }
    }

    /// Feed one check result; `Some(new_state)` on a transition.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let need = if self.up { self.fall } else { self.rise };
        if self.streak >= need {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// How a check reaches the target (a real TCP connect, or a fake in tests).
pub trait Connector: Send + Sync + 'static {
    fn check(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// TCP connect within the timeout.
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn check(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            matches!(
                tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            )
        })
    }
}

/// Told about every transition (rule name, target, new state: true = up). Also told the
/// first state (`initial`) so it can publish it.
pub trait HealthSink: Send + Sync + 'static {
    fn initial(&self, rule: &str, target: SocketAddr, up: bool);
    fn transition(&self, rule: &str, target: SocketAddr, up: bool);
}

/// Check `h.connect` forever (until the task is aborted), starting in state `up`.
pub async fn run_checker(
    rule: String,
    h: Health,
    up: bool,
    connector: Arc<dyn Connector>,
    sink: Arc<dyn HealthSink>,
) {
    let mut m = Machine::starting(h.fall, h.rise, up);
    sink.initial(&rule, h.connect, m.up);
    let mut tick = tokio::time::interval(h.interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = connector.check(h.connect, h.timeout).await;
        if let Some(up) = m.observe(ok) {
            sink.transition(&rule, h.connect, up);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn fall_and_rise() {
        let mut m = Machine::new(3, 2);
        assert!(m.up);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(true), None); // streak broken
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), Some(false));
        assert!(!m.up);
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(true), None);
        assert_eq!(m.observe(true), Some(true));
        assert!(m.up);
    }

    struct Fake(AtomicBool);
    impl Connector for Fake {
        fn check(
            &self,
            _: SocketAddr,
            _: Duration,
        ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
            let ok = self.0.load(Ordering::SeqCst);
            Box::pin(async move { ok })
        }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<(String, bool)>>);
    impl HealthSink for Log {
        fn initial(&self, _: &str, _: SocketAddr, _: bool) {}
        fn transition(&self, rule: &str, _: SocketAddr, up: bool) {
            self.0.lock().unwrap().push((rule.to_string(), up));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn checker_drives_the_sink() {
        let fake = Arc::new(Fake(AtomicBool::new(true)));
        let log = Arc::new(Log::default());
        let h = Health {
            connect: "127.0.0.1:1".parse().unwrap(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(100),
            fall: 3,
            rise: 2,
        };
        let task = tokio::spawn(run_checker(
            "web".into(),
            h,
            true,
            fake.clone(),
            log.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(log.0.lock().unwrap().is_empty());
        fake.0.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(*log.0.lock().unwrap(), vec![("web".to_string(), false)]);
        fake.0.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            *log.0.lock().unwrap(),
            vec![("web".to_string(), false), ("web".to_string(), true)]
        );
        task.abort();
    }
}

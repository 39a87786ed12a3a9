//! The NFQUEUE engine against the real kernel, inside a throw-away network namespace: an
//! inet-table rule (built with brdivert's model, xt `NFQUEUE` through nft compat, bypass)
//! queues TCP to 127.0.0.1:5555; a test decider answers. Needs root; skips otherwise.

#[path = "common/netns_rt.rs"]
mod netns_rt;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brdivert::nft::netlink;
use brdivert::nft::{
    BaseChain, Chain, ChainType, Dir, Family, Hook, L4, Match, QueueForm, Rule, Ruleset, Set,
    SetElem, SetKind, Stmt, Table,
};
use brdivert::queue::parse::{PROTO_TCP, TCP_SYN};
use brdivert::queue::{
    Decider, Fallback, FlowKey, HealthFlag, ListsHandle, MarkLayout, PacketInfo, PolicyDecider,
    QueueConfig, QueueEngine, RateLimit, Verdict, sys,
};
use netns_rt::{Netns, netns_or_skip};

const TABLE: &str = "brdivert-queue-test";
const PORT: u16 = 5555;

/// The ruleset: input chain (priority 0) queues TCP to PORT; a later input chain
/// (priority 10, where an accepted packet continues) counts packets carrying the divert
/// mark of tag 5 and those carrying the bypass mark.
fn ruleset(num: u16, fanout: u16, layout: &MarkLayout) -> Ruleset {
    ruleset_with(num, fanout, layout, vec![])
}

/// `ruleset`, with extra matches on the queueing rule.
fn ruleset_with(num: u16, fanout: u16, layout: &MarkLayout, extra: Vec<Match>) -> Ruleset {
    let mark_rule = |v: &Verdict, comment: &str| Rule {
        matches: vec![Match::Mark {
            mask: layout.mask(),
            value: layout.value(v).expect("fits"),
        }],
        stmts: vec![Stmt::Counter],
        comment: Some(comment.into()),
    };
    Ruleset {
        tables: vec![Table {
            family: Family::Inet,
            name: TABLE.into(),
            sets: vec![Set {
                name: "qports".into(),
                kind: SetKind::InetService,
                interval: true,
                elements: vec![SetElem::Ports(PORT, PORT)],
                dynamic: None,
                keep: false,
            }],
            chains: vec![
                Chain {
                    name: "queue".into(),
                    base: Some(BaseChain {
                        kind: ChainType::Filter,
                        hook: Hook::Input,
                        priority: 0,
                    }),
                    rules: vec![Rule {
                        matches: [Match::Port {
                            l4: L4::Tcp,
                            dir: Dir::Dst,
                            negate: false,
                            set: "qports".into(),
                        }]
                        .into_iter()
                        .chain(extra)
                        .collect(),
                        stmts: vec![
                            Stmt::Counter,
                            Stmt::Queue {
                                num,
                                fanout,
                                bypass: true,
                                form: QueueForm::XtCompat,
                            },
                        ],
                        comment: Some("queued".into()),
                    }],
                },
                Chain {
                    name: "after".into(),
                    base: Some(BaseChain {
                        kind: ChainType::Filter,
                        hook: Hook::Input,
                        priority: 10,
                    }),
                    rules: vec![
                        mark_rule(&Verdict::Divert(5), "diverted"),
                        mark_rule(&Verdict::Bypass, "bypassed"),
                    ],
                },
            ],
        }],
    }
}

/// Packets counted by the rule with `comment` (from `nft list table`).
fn counter(ns: &Netns, comment: &str) -> u64 {
    let listing = ns.list("inet", TABLE);
    let line = listing
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule {comment:?} in\n{listing}"));
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().and_then(|n| n.parse().ok()).expect("count");
        }
    }
    panic!("no counter in {line:?}")
}

/// A decider whose answer the test sets, recording what it saw.
#[derive(Default)]
struct TestDecider {
    answer: Mutex<Option<Verdict>>,
    seen: Mutex<Vec<(FlowKey, Option<u8>)>>,
}

impl TestDecider {
    fn answer(&self, v: Option<Verdict>) {
        *self.answer.lock().unwrap() = v;
    }
    fn syns_to(&self, port: u16) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, f)| {
                k.proto == PROTO_TCP && k.dport == port && f.is_some_and(|f| f & TCP_SYN != 0)
            })
            .count()
    }
}

impl Decider for TestDecider {
    fn decide(&self, pkt: &PacketInfo) -> Verdict {
        self.seen
            .lock()
            .unwrap()
            .push((*pkt.key(), pkt.headers.tcp_flags));
        // None: panic (without holding a lock), to check a panicking decider fails open
        let answer = *self.answer.lock().unwrap();
        answer.expect("test decider told to panic")
    }
}

/// Sets up lo, the ruleset and a listener on 127.0.0.1:PORT. None: the kernel can't.
fn setup(ns: &Netns, num: u16, fanout: u16, layout: &MarkLayout) -> Option<TcpListener> {
    setup_with(ns, ruleset(num, fanout, layout))
}

fn setup_with(ns: &Netns, rs: Ruleset) -> Option<TcpListener> {
    let caps = ns.run(brdivert::probe::probe);
    if !caps.xt_nfqueue {
        eprintln!("skipping: kernel lacks xt NFQUEUE through nft compat");
        return None;
    }
    let st = std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "set", "lo", "up"])
        .status()
        .expect("ip link");
    assert!(st.success());
    ns.run(|| netlink::apply(&rs)).expect("apply queue ruleset");
    Some(
        ns.run(|| TcpListener::bind(("127.0.0.1", PORT)))
            .expect("listen"),
    )
}

fn connect(ns: &Netns) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(1500)))
}

#[test]
fn queue_decisions_marks_drops_and_fail_open() {
    let Some(ns) = netns_or_skip("queue_decisions_marks_drops_and_fail_open") else {
        return;
    };
    let layout = MarkLayout::default();
    let Some(_listener) = setup(&ns, 7, 1, &layout) else {
        return;
    };
    let decider = Arc::new(TestDecider::default());
    decider.answer(Some(Verdict::Divert(5)));
    let cfg = QueueConfig {
        num: 7,
        count: 1,
        layout,
        ..QueueConfig::default()
    };
    let engine = ns
        .run(|| QueueEngine::start(cfg.clone(), decider.clone() as Arc<dyn Decider>))
        .expect("start engine");
    assert!(engine.is_running());
    let bound = ns.run(sys::kernel_queues).expect("kernel queues");
    let q = bound.iter().find(|q| q.num == 7).expect("queue 7 bound");
    assert_eq!(q.copy_range, 128, "headers only");
    let rcvbuf = engine.stats().queue(7).unwrap().rcvbuf.load(Relaxed);
    assert!(rcvbuf >= 8 << 20, "receive buffer {rcvbuf}");

    // Divert(5): connects, the decider saw the SYN, the later chain saw the mark
    connect(&ns).expect("connect with Divert");
    assert!(decider.syns_to(PORT) >= 1, "decider saw no SYN");
    assert!(counter(&ns, "diverted") >= 1, "{}", ns.list("inet", TABLE));
    let stats = engine.stats();
    assert!(stats.totals().divert >= 1);

    // Bypass: connects, with the bypass mark
    decider.answer(Some(Verdict::Bypass));
    let before = counter(&ns, "diverted");
    connect(&ns).expect("connect with Bypass");
    assert!(counter(&ns, "bypassed") >= 1);
    assert_eq!(counter(&ns, "diverted"), before, "bypass cleared the tag");

    // Drop: the SYN (and its retransmissions) never arrive
    decider.answer(Some(Verdict::Drop));
    let e = connect(&ns).expect_err("connect must fail with Drop");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "{e}"
    );
    assert!(stats.totals().drop >= 1);

    // a panicking decider is answered as bypass
    decider.answer(None);
    connect(&ns).expect("connect with a panicking decider");
    assert!(stats.totals().decider_panics >= 1);

    let t = stats.totals();
    assert!(
        t.packets >= t.divert + t.bypass + t.drop && t.packets > 0,
        "{t:?}"
    );
    assert_eq!(t.parse_errors, 0);
    assert!(stats.latency.count() >= t.packets - 1);
    assert!(stats.latency.p99().is_some());
    eprintln!(
        "verdict latency p50 {:?} p99 {:?}, {t:?}",
        stats.latency.p50(),
        stats.latency.p99()
    );

    // stopped: the queue is unbound and the rule's bypass lets traffic through
    let stats = Arc::clone(engine.stats());
    engine.stop();
    // counted after stop: a late packet (retransmit, FIN) may still be decided before it
    let seen = decider.seen.lock().unwrap().len();
    let bound = ns.run(sys::kernel_queues).unwrap_or_default();
    assert!(bound.iter().all(|q| q.num != 7), "still bound: {bound:?}");
    connect(&ns).expect("connect with the engine stopped (bypass)");
    assert_eq!(decider.seen.lock().unwrap().len(), seen);
    assert!(counter(&ns, "queued") > stats.totals().packets);
}

#[test]
fn fanout_binds_every_queue_and_restarts() {
    let Some(ns) = netns_or_skip("fanout_binds_every_queue_and_restarts") else {
        return;
    };
    let layout = MarkLayout::default();
    let Some(_listener) = setup(&ns, 20, 3, &layout) else {
        return;
    };
    let decider: Arc<dyn Decider> = Arc::new(|_: &PacketInfo| Verdict::Divert(5));
    let cfg = QueueConfig {
        num: 20,
        count: 3,
        layout,
        ..QueueConfig::default()
    };
    for round in 0..2 {
        let engine = ns
            .run(|| QueueEngine::start(cfg.clone(), Arc::clone(&decider)))
            .unwrap_or_else(|e| panic!("start, round {round}: {e:#}"));
        assert_eq!(engine.queues(), &[20, 21, 22]);
        let bound = ns.run(sys::kernel_queues).expect("kernel queues");
        for n in 20..23 {
            assert!(bound.iter().any(|q| q.num == n), "{n} not bound: {bound:?}");
        }
        // a second engine on the same queues is refused, and leaves the first intact
        let e = ns
            .run(|| QueueEngine::start(cfg.clone(), Arc::clone(&decider)))
            .expect_err("queues already bound");
        eprintln!("second engine: {e:#}");
        assert!(engine.is_running());
        for _ in 0..10 {
            connect(&ns).expect("connect");
        }
        // read the counters once nothing can change them any more
        let stats = Arc::clone(engine.stats());
        engine.stop();
        let t = stats.totals();
        assert!(t.divert >= 10, "{t:?}");
        let per_queue: u64 = stats.queues.iter().map(|q| q.packets.load(Relaxed)).sum();
        assert_eq!(per_queue, t.packets);
    }
}

#[test]
fn policy_decider_health_lists_and_rate_limit() {
    let Some(ns) = netns_or_skip("policy_decider_health_lists_and_rate_limit") else {
        return;
    };
    let layout = MarkLayout::default();
    let Some(_listener) = setup(&ns, 30, 1, &layout) else {
        return;
    };
    let health = HealthFlag::new(true);
    let lists = ListsHandle::default();
    let decider = Arc::new(
        PolicyDecider::new(layout, lists.clone())
            .with_queues([30], 5)
            .with_rule(5, health.clone(), Fallback::Drop)
            .with_rate_limit(RateLimit {
                per_sec: 0.0,
                burst: 6.0,
                on_exceed: Fallback::Bypass,
                ..RateLimit::default()
            }),
    );
    let cfg = QueueConfig {
        num: 30,
        count: 1,
        layout,
        ..QueueConfig::default()
    };
    let engine = ns
        .run(|| QueueEngine::start(cfg.clone(), decider.clone() as Arc<dyn Decider>))
        .expect("start engine");
    let stats = Arc::clone(engine.stats());

    // healthy: diverted (this test rule queues every packet to PORT, not only the first of
    // each flow, so each connect spends a few tokens of the source's burst of 6)
    connect(&ns).expect("healthy");
    assert!(counter(&ns, "diverted") >= 1);
    // unhealthy with on_unhealthy = drop: refused
    health.set(false);
    connect(&ns).expect_err("unhealthy target, on_unhealthy = drop");
    health.set(true);
    // the source is over its burst by now: bypassed
    let bypassed = counter(&ns, "bypassed");
    for _ in 0..3 {
        connect(&ns).expect("over the rate limit: bypass");
    }
    assert!(counter(&ns, "bypassed") > bypassed);
    // deny list wins
    lists.update(|l| l.deny.insert("127.0.0.0/8".parse().unwrap()));
    connect(&ns).expect_err("denied");
    lists.store(Default::default());
    let t = stats.totals();
    assert!(t.divert >= 1 && t.drop >= 2 && t.bypass >= 1, "{t:?}");
    engine.stop();
}

/// With the kernel queue full (max length 1, the decider holding the one packet), further
/// packets are accepted at once (NFQA_CFG_F_FAIL_OPEN) instead of dropped (a dropped SYN
/// costs its connect a 1 s retransmission, longer than the connects here may take).
#[test]
fn full_queue_fails_open() {
    let Some(ns) = netns_or_skip("full_queue_fails_open") else {
        return;
    };
    let layout = MarkLayout::default();
    let Some(_listener) = setup(&ns, 40, 1, &layout) else {
        return;
    };
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let held_tx = Mutex::new(held_tx);
    let release_rx = Mutex::new(release_rx);
    let first = std::sync::atomic::AtomicBool::new(true);
    let decider: Arc<dyn Decider> = Arc::new(move |_: &PacketInfo| {
        if first.swap(false, Relaxed) {
            let _ = held_tx.lock().unwrap().send(());
            let _ = release_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(5));
        }
        Verdict::Divert(5)
    });
    let cfg = QueueConfig {
        num: 40,
        count: 1,
        max_len: 1,
        layout,
        ..QueueConfig::default()
    };
    let engine = ns
        .run(|| QueueEngine::start(cfg.clone(), decider))
        .expect("start engine");
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    std::thread::scope(|s| {
        let held = s.spawn(|| connect(&ns));
        held_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the decider got the first SYN");
        // the queue is full now: these go through without a decision
        ns.run(|| {
            for i in 0..3 {
                TcpStream::connect_timeout(&addr, Duration::from_millis(800))
                    .unwrap_or_else(|e| panic!("connect {i} while the queue is full: {e}"));
            }
        });
        release_tx.send(()).expect("release");
        held.join().expect("thread").expect("the held connect");
    });
    // more packets hit the queueing rule than reached the engine
    let t = engine.stats().totals();
    assert!(counter(&ns, "queued") > t.packets, "{t:?}");
    engine.stop();
}

/// Rough figures, not a pass/fail test: loopback connects a second with every packet to
/// PORT queued and decided, against the same with the engine stopped (rule bypass), and the
/// engine's latency histogram. `cargo test --release --test queue -- --ignored --nocapture`.
#[test]
#[ignore]
fn queue_rate_figures() {
    let Some(ns) = netns_or_skip("queue_rate_figures") else {
        return;
    };
    let layout = MarkLayout::default();
    let Some(listener) = setup(&ns, 50, 2, &layout) else {
        return;
    };
    listener.set_nonblocking(true).expect("nonblocking");
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    // all connects from one thread inside the namespace
    let rate = |n: usize| {
        ns.run(|| {
            let t0 = std::time::Instant::now();
            for _ in 0..n {
                drop(TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect"));
                while listener.accept().is_ok() {}
            }
            n as f64 / t0.elapsed().as_secs_f64()
        })
    };
    let n = 3000;
    for pair in 0..4 {
        // alternate which half of the pair runs first
        let mut bare = if pair % 2 == 0 { rate(n) } else { 0.0 };
        let decider: Arc<dyn Decider> = Arc::new(|_: &PacketInfo| Verdict::Divert(5));
        let cfg = QueueConfig {
            num: 50,
            count: 2,
            layout,
            ..QueueConfig::default()
        };
        let engine = ns.run(|| QueueEngine::start(cfg, decider)).expect("start");
        let queued = rate(n);
        let s = Arc::clone(engine.stats());
        engine.stop();
        if pair % 2 == 1 {
            bare = rate(n);
        }
        eprintln!(
            "pair {pair}: {bare:.0} conn/s bypassed, {queued:.0} conn/s queued ({:.2}x); \
             verdict latency p50 {:?} p99 {:?}; {:?}",
            queued / bare,
            s.latency.p50(),
            s.latency.p99(),
            s.totals()
        );
    }
}

/// The conntrack-mark pinning the compiler is to emit, checked end to end: the verdict mark
/// is saved in the ct mark (a chain after the queueing one: an accepted packet continues at
/// the next chain of the hook) and restored on every later packet (a chain before it), and
/// the queue rule only takes undecided packets. So exactly one packet per connection, the
/// SYN, reaches userspace, while every client packet of the flow carries the divert mark.
/// (nft text for the ct parts, whole marks for brevity: nft 1.0.6 cannot combine two
/// registers in one masked expression; the model's queue rule because nft text cannot load
/// the xt target.)
#[test]
fn only_the_first_packet_of_each_flow_is_queued() {
    let Some(ns) = netns_or_skip("only_the_first_packet_of_each_flow_is_queued") else {
        return;
    };
    let layout = MarkLayout::default();
    let undecided = Match::Mark {
        mask: layout.verdict_mask(),
        value: 0,
    };
    let Some(listener) = setup_with(&ns, ruleset_with(60, 1, &layout, vec![undecided])) else {
        return;
    };
    let pin = format!(
        "table inet brdpin {{\n\
         chain restore {{ type filter hook input priority -10; ct mark & {v:#x} != 0 meta mark set ct mark; }}\n\
         chain pin {{ type filter hook input priority 5; ct mark & {v:#x} == 0 meta mark & {v:#x} != 0 ct mark set meta mark; }}\n\
         }}\n",
        v = layout.verdict_mask()
    );
    let path = std::env::temp_dir().join(format!("{}.nft", ns.name));
    std::fs::write(&path, pin).expect("write nft file");
    let (ok, _, err) = ns.nft(&["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    assert!(ok, "nft -f: {err}");

    let decider: Arc<dyn Decider> = Arc::new(|_: &PacketInfo| Verdict::Divert(5));
    let cfg = QueueConfig {
        num: 60,
        count: 1,
        layout,
        ..QueueConfig::default()
    };
    let engine = ns
        .run(|| QueueEngine::start(cfg, decider))
        .expect("start engine");
    let conns = 5;
    let msgs = 10;
    let addr: SocketAddr = ([127, 0, 0, 1], PORT).into();
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            for _ in 0..conns {
                let (mut c, _) = listener.accept().expect("accept");
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut c, &mut buf).expect("read");
                assert_eq!(buf.len(), msgs);
            }
        });
        ns.run(|| {
            for _ in 0..conns {
                let mut c =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
                c.set_nodelay(true).expect("nodelay");
                for _ in 0..msgs {
                    std::io::Write::write_all(&mut c, b"x").expect("write");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        server.join().expect("server");
    });
    let t = engine.stats().totals();
    assert_eq!(t.packets, conns as u64, "one packet per flow: {t:?}");
    assert_eq!(t.divert, conns as u64);
    let marked = counter(&ns, "diverted");
    assert!(
        marked >= (conns * (msgs + 2)) as u64,
        "every client packet carries the mark: {marked}\n{}",
        ns.ruleset()
    );
    engine.stop();
}

//! Nodes behind a real HAProxy (confab-testhaproxy): WebSockets through it,
//! its health checks on `/healthz`, client addresses passed with the PROXY
//! protocol v2 and believed only from the proxy, and a node that drains or
//! dies taken out of service. HAProxy connects to the nodes from
//! 127.0.0.9, their `--trusted-proxy`; clients of a test bind other
//! loopback addresses to stand for other machines.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use confab_client::ServerUrl;
use confab_testhaproxy::{HaProxy, Options, SOURCE};
use confab_testpg::Postgres;
use confab_testredis::Redis;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// `n` nodes on one database and `redis`, trusting HAProxy's address.
async fn nodes(redis: &Redis, n: usize, more: &[&str]) -> Vec<TestServer> {
    let url = Postgres::shared().fresh_database();
    let redis_url = redis.url();
    let proxy = SOURCE.to_string();
    let mut flags = vec![
        "--database",
        &url,
        "--redis",
        &redis_url,
        "--trusted-proxy",
        &proxy,
    ];
    flags.extend_from_slice(more);
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(TestServer::start_with(&flags).await);
    }
    nodes
}

fn behind(nodes: &[TestServer], options: Options) -> (HaProxy, ServerUrl) {
    let ports: Vec<u16> = nodes.iter().map(TestServer::port).collect();
    let haproxy = HaProxy::start(&ports, options);
    for i in 1..=nodes.len() {
        haproxy.wait_for(&format!("n{i}"), "UP", WAIT);
    }
    let url = ServerUrl::parse(&haproxy.url()).unwrap();
    (haproxy, url)
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The confab_connections gauge of each node.
async fn connections(nodes: &[&TestServer]) -> Vec<f64> {
    let mut counts = Vec::new();
    for node in nodes {
        counts.push(metric(&node.metrics().await, "confab_connections").unwrap_or(0.0));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_and_bob_chat_through_haproxy_in_front_of_three_nodes() {
    let redis = Redis::start();
    let nodes = nodes(&redis, 3, &["--proxy-protocol"]).await;
    let (_haproxy, url) = behind(&nodes, Options::default());
    let alice = TestUser::register(&url, "alice").await;
    let bob = TestUser::register(&url, "bob").await;
    bob.accepts("alice").await;
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    // leastconn: the two WebSockets are on two nodes.
    let refs: Vec<&TestServer> = nodes.iter().collect();
    let counts = connections(&refs).await;
    assert_eq!(
        counts.iter().filter(|c| **c == 1.0).count(),
        2,
        "{counts:?}"
    );

    let conv = a.open("bob").await.unwrap();
    every_tick(
        (&a, &mut a_events),
        (&b, &mut b_events, "bob"),
        conv,
        "through the balancer",
    )
    .await;
    for node in &nodes {
        node.assert_no_panics();
    }
}

/// One node (the per-address limits are counted per node), one WebSocket
/// per address. With the PROXY protocol 127.0.0.2 and 127.0.0.3 are two
/// addresses; without it both are the proxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_source_addresses_through_haproxy_are_seen_as_two() {
    let redis = Redis::start();
    for proxied in [true, false] {
        let mut flags = vec!["--connections-per-address", "1"];
        if proxied {
            flags.push("--proxy-protocol");
        }
        let nodes = nodes(&redis, 1, &flags).await;
        let options = Options {
            send_proxy: proxied,
            ..Options::default()
        };
        let (_haproxy, url) = behind(&nodes, options);
        let alice = TestUser::register(&url, &format!("alice{proxied}")).await;

        let _first = RawSocket::connect_from(&url, loopback(2))
            .await
            .expect("the first socket from 127.0.0.2")
            .auth(&alice)
            .await;
        let again = RawSocket::connect_from(&url, loopback(2)).await;
        assert!(
            refused(&again),
            "a second socket from 127.0.0.2 (proxied: {proxied})"
        );
        let other = RawSocket::connect_from(&url, loopback(3)).await;
        if proxied {
            other
                .expect("127.0.0.3 is another address")
                .auth(&alice)
                .await;
        } else {
            assert!(
                refused(&other),
                "without the header 127.0.0.3 is the proxy too"
            );
        }
        nodes[0].assert_no_panics();
    }
}

/// Three nodes that would each take many sockets from 127.0.0.2, behind
/// HAProxy's per-source cap (docs/haproxy.cfg's stick table): past it, the
/// cluster refuses 127.0.0.2 whatever node a connection would reach, while
/// other addresses still get in, and a place freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_across_all_nodes_by_haproxy() {
    const CAP: u32 = 6;
    let redis = Redis::start();
    let mut more = vec!["--proxy-protocol"];
    // Far above the cap: only HAProxy can be what refuses.
    more.extend_from_slice(MANY_SOCKETS);
    let nodes = nodes(&redis, 3, &more).await;
    let options = Options {
        balance: "roundrobin",
        connections_per_source: Some(CAP),
        ..Options::default()
    };
    let (haproxy, url) = behind(&nodes, options);
    let alice = TestUser::register(&url, "alice").await;

    let mut held = Vec::new();
    for i in 0..CAP {
        let socket = RawSocket::connect_from(&url, loopback(2))
            .await
            .unwrap_or_else(|e| panic!("socket {i} from 127.0.0.2: {e}"))
            .auth(&alice)
            .await;
        held.push(socket);
    }
    let refs: Vec<&TestServer> = nodes.iter().collect();
    let counts = connections(&refs).await;
    assert!(
        counts.iter().all(|c| *c > 0.0) && counts.iter().sum::<f64>() == f64::from(CAP),
        "the sockets are on all three nodes: {counts:?}"
    );
    assert_eq!(haproxy.connections_from(loopback(2)), CAP);

    // One more from 127.0.0.2: HAProxy resets it at once (the TCP connect,
    // the request or the read fails), before any node answers.
    let answer = health_through(&haproxy, loopback(2)).await;
    assert!(
        matches!(&answer, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "connection {} from 127.0.0.2: {answer:?}",
        CAP + 1
    );
    assert_eq!(connections(&refs).await, counts, "no node saw it");

    // Another address is not counted with it.
    let mut other = RawSocket::connect_from(&url, loopback(3))
        .await
        .expect("127.0.0.3 is another address")
        .auth(&alice)
        .await;
    assert!(other.answers_ping().await);

    // One of 127.0.0.2's closes: once HAProxy has seen it go, its place is
    // free again.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    while haproxy.connections_from(loopback(2)) == CAP {
        assert!(
            Instant::now() < deadline,
            "HAProxy still counts {CAP} from 127.0.0.2 {WAIT:?} after one closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = RawSocket::connect_from(&url, loopback(2))
        .await
        .expect("a socket from 127.0.0.2 in the freed place")
        .auth(&alice)
        .await;
    held.push(again);
    assert_eq!(haproxy.connections_from(loopback(2)), CAP);
    for socket in &mut held {
        assert!(socket.answers_ping().await, "the held sockets are alive");
    }
    for node in &nodes {
        node.assert_no_panics();
    }
}

/// `GET /healthz` through HAProxy from `source`: the answer, or how the
/// connection failed (a read that waits past [`WAIT`] panics).
async fn health_through(haproxy: &HaProxy, source: IpAddr) -> std::io::Result<String> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], haproxy.port())))
        .await?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("an answer or a close in time")?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn refused(socket: &Result<RawSocket, Box<tokio_tungstenite::tungstenite::Error>>) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    match socket {
        Err(e) => match e.as_ref() {
            Error::Http(response) => {
                let body = response.body().as_deref().unwrap_or_default();
                response.status() == 503
                    && String::from_utf8_lossy(body).contains("too_many_connections")
            }
            _ => false,
        },
        Ok(_) => false,
    }
}

/// The answer to `request` on a TCP connection from `source`, after
/// `header`; empty if the node closed it without one.
async fn from(source: IpAddr, node: &TestServer, header: &[u8], request: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], node.port())))
        .await
        .unwrap();
    let _ = tcp.write_all(header).await;
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn v2(command: ppp::v2::Command, addresses: ppp::v2::Addresses) -> Vec<u8> {
    use ppp::v2::{Builder, Protocol, Version};
    Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
        .build()
        .unwrap()
}

#[tokio::test]
async fn only_the_trusted_proxy_sends_a_proxy_header_and_it_must() {
    use ppp::v2::{Addresses, Command};
    let redis = Redis::shared();
    let node = nodes(redis, 1, &["--proxy-protocol"]).await.remove(0);
    let health = "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let to: SocketAddr = "127.0.0.1:1".parse().unwrap();

    // The proxy's own connection (its health check) and a client's.
    let local = from(
        SOURCE,
        &node,
        &v2(Command::Local, Addresses::Unspecified),
        health,
    )
    .await;
    assert!(local.starts_with("HTTP/1.1 200"), "{local}");
    let proxied = from(
        SOURCE,
        &node,
        &v2(Command::Proxy, (client, to).into()),
        health,
    )
    .await;
    assert!(proxied.starts_with("HTTP/1.1 200"), "{proxied}");
    let v1 = from(
        SOURCE,
        &node,
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 1\r\n",
        health,
    )
    .await;
    assert!(v1.starts_with("HTTP/1.1 200"), "{v1}");

    // The proxy without a header, or with garbage: closed, nothing said.
    assert_eq!(from(SOURCE, &node, b"", health).await, "");
    assert_eq!(
        from(SOURCE, &node, b"PROXY TCP4 nonsense\r\n", health).await,
        ""
    );
    let refused = metric(&node.metrics().await, "confab_proxy_headers_refused_total");
    assert_eq!(refused, Some(2.0));

    // Anyone else's header is not read as one: a bad request.
    let forged = from(
        loopback(1),
        &node,
        &v2(Command::Proxy, (client, to).into()),
        health,
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 400"), "{forged}");
    node.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_and_a_killed_one_get_no_new_connections() {
    let redis = Redis::start();
    let mut more = vec!["--proxy-protocol", "--shutdown-grace-ms", "10000"];
    more.extend_from_slice(MANY_SOCKETS);
    let mut nodes = nodes(&redis, 3, &more).await;
    let (haproxy, url) = behind(&nodes, Options::default());
    let alice = TestUser::register(&url, "alice").await;

    // n1 is told to stop: it fails its health check while it still serves.
    nodes[0].terminate();
    haproxy.wait_for("n1", "DOWN", WAIT);
    let mut sockets = Vec::new();
    for _ in 0..6 {
        sockets.push(RawSocket::connect(&url).await.auth(&alice).await);
    }
    let counts = connections(&[&nodes[1], &nodes[2]]).await;
    assert_eq!(
        counts.iter().sum::<f64>(),
        6.0,
        "n2 and n3 hold every new socket: {counts:?}"
    );

    // n2 dies: its sockets go, and new ones land on n3.
    let before = connections(&[&nodes[2]]).await[0];
    nodes[1].kill9().await;
    haproxy.wait_for("n2", "DOWN", WAIT);
    for _ in 0..3 {
        sockets.push(RawSocket::connect(&url).await.auth(&alice).await);
    }
    assert_eq!(connections(&[&nodes[2]]).await[0], before + 3.0);

    // The operator's way: drain n3 in HAProxy, bring n2 back.
    nodes[1].restart().await;
    haproxy.wait_for("n2", "UP", WAIT);
    haproxy.set_state("n3", "drain");
    haproxy.wait_for("n3", "DRAIN", WAIT);
    let on_n3 = connections(&[&nodes[2]]).await[0];
    for _ in 0..2 {
        sockets.push(RawSocket::connect(&url).await.auth(&alice).await);
    }
    assert_eq!(connections(&[&nodes[1]]).await[0], 2.0);
    assert_eq!(
        connections(&[&nodes[2]]).await[0],
        on_n3,
        "a draining node keeps only what it had"
    );
    nodes[2].assert_no_panics();
}

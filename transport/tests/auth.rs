//! Authentication: certificates from another CA, hellos that lie about the node id, garbage on streams.

mod common;

use std::time::Duration;

use common::*;
use transport::wire::{self, code};
use transport::{Frame, Lane, Security};

/// Nodes 1 and 2 still talk to each other.
async fn still_serving(nodes: &mut [Node]) {
    nodes[1]
        .t
        .send(1, Frame::new(4, 4, "still here"), Lane::Control)
        .unwrap();
    let m = recv(&mut nodes[0]).await;
    assert_eq!((m.from, m.frame.payload.as_ref()), (2, &b"still here"[..]));
}

#[tokio::test]
async fn certificate_from_another_ca_is_rejected_and_logged() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let pki = Pki::new();
    let rogue_pki = Pki::new();
    let mut nodes = mesh(&pki, &[1, 2]);
    let server = nodes[0].t.local_addr();

    // Trusts our CA (so it accepts node 1 as server) but presents a node-3 cert from another CA.
    let mut rogue = rogue_pki.identity(3);
    rogue.roots = pki.identity(1).roots.clone();
    if let Ok(conn) = raw_connect(rogue, server, 1).await {
        assert!(
            hello(&conn, 3).await.is_err(),
            "a rejected client must never get a hello answer"
        );
        if let Ok(mut s) = conn.open_uni().await {
            let mut buf = bytes::BytesMut::from(&[wire::STREAM_FRAMES][..]);
            Frame::new(1, 1, "sneaky").encode_into(&mut buf);
            let _ = s.write_all(&buf).await;
        }
    }
    // A full transport with the rogue identity, peered with node 1, never gets through either.
    let rogue_node = start(fast_config(3), Security::MutualTls(rogue_pki.identity(3)));
    rogue_node.t.add_peer(1, server).unwrap();
    let _ = rogue_node.t.send(1, Frame::new(1, 1, "sneaky"), Lane::Data);
    assert!(
        !rogue_node
            .t
            .wait_connected(1, Duration::from_millis(500))
            .await
    );
    assert!(rogue_node.t.peer_stats(1).unwrap().connect_failures > 0);

    assert_silent(&mut nodes[0], Duration::from_millis(200)).await;
    still_serving(&mut nodes).await;
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("WARN")
            && l.contains("rejected incoming connection")
            && l.contains("127.0.0.1")),
        "rejection must be logged with the remote address:\n{text}"
    );
}

#[tokio::test]
async fn hello_claiming_another_node_than_the_certificate_is_rejected() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let pki = Pki::new();
    let mut nodes = mesh(&pki, &[1, 2]);
    let server = nodes[0].t.local_addr();

    let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
    let err = hello(&conn, 2).await.unwrap_err();
    assert!(!err.is_empty());
    closed_with(&conn, code::HELLO_REJECTED).await;
    assert!(logs
        .text()
        .contains("hello claims node 2 but the certificate is not for node-2.bd.local"));

    // Claiming our own id, or the server's id, is refused the same way.
    let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
    assert!(hello(&conn, 1).await.is_err());
    closed_with(&conn, code::HELLO_REJECTED).await;

    // The honest hello from the same certificate works and is answered by node 1.
    let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
    assert_eq!(hello(&conn, 3).await, Ok(1));
    let mut s = conn.open_uni().await.unwrap();
    let mut buf = bytes::BytesMut::from(&[wire::STREAM_FRAMES][..]);
    Frame::new(6, 60, "honest").encode_into(&mut buf);
    s.write_all(&buf).await.unwrap();
    let m = recv(&mut nodes[0]).await;
    assert_eq!((m.from, m.frame.kind, m.frame.group), (3, 6, 60));
    still_serving(&mut nodes).await;
}

#[tokio::test]
async fn dialing_a_node_that_holds_another_nodes_certificate_fails() {
    let pki = Pki::new();
    let impostor = start(fast_config(2), Security::MutualTls(pki.identity(2)));
    let node = start(fast_config(1), Security::MutualTls(pki.identity(1)));
    // Node 1 believes node 3 lives at the impostor's address; the server-name check refuses it.
    node.t.add_peer(3, impostor.t.local_addr()).unwrap();
    assert!(!node.t.wait_connected(3, Duration::from_millis(500)).await);
    assert!(node.t.peer_stats(3).unwrap().connect_failures > 0);
}

#[tokio::test]
async fn garbage_on_streams_closes_only_that_connection() {
    let pki = Pki::new();
    let mut nodes = mesh(&pki, &[1, 2]);
    let server = nodes[0].t.local_addr();
    still_serving(&mut nodes).await;

    // 1. Random bytes instead of a hello.
    let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&rand::random::<[u8; 64]>()).await.unwrap();
    closed_with(&conn, code::HELLO_REJECTED).await;

    // 2. A frame stream whose length prefix is absurd, 3. one shorter than the header,
    // 4. an unknown stream kind, 5. a stream ending inside a frame.
    let mut huge = vec![wire::STREAM_FRAMES];
    huge.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    huge.extend_from_slice(&rand::random::<[u8; 256]>());
    let mut short = vec![wire::STREAM_FRAMES];
    short.extend_from_slice(&3u32.to_le_bytes());
    short.extend_from_slice(&rand::random::<[u8; 32]>());
    let mut unknown = vec![0xEEu8];
    unknown.extend_from_slice(&rand::random::<[u8; 32]>());
    let mut truncated = vec![wire::STREAM_FRAMES];
    truncated.extend_from_slice(&100u32.to_le_bytes());
    truncated.extend_from_slice(&[1, 2, 3]);
    for garbage in [huge, short, unknown, truncated] {
        let conn = raw_connect(pki.identity(3), server, 1).await.unwrap();
        assert_eq!(hello(&conn, 3).await, Ok(1));
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&garbage).await.unwrap();
        s.finish().unwrap();
        closed_with(&conn, code::PROTOCOL).await;
        still_serving(&mut nodes).await;
    }
    // 6. Random UDP datagrams at the endpoint's port.
    let udp = std::net::UdpSocket::bind(loopback()).unwrap();
    for len in [1usize, 20, 1200, 1500] {
        let junk: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        udp.send_to(&junk, server).unwrap();
    }
    assert_silent(&mut nodes[0], Duration::from_millis(100)).await;
    still_serving(&mut nodes).await;
}

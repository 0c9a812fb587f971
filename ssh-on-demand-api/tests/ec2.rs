//! The EC2 backend against moto's EC2 server (PyPI `moto[server]`) with signature checking on. The
//! instances live in a VPC whose subnet is in 127.0.0.0/8, so every private address is loopback.

mod common;

use std::thread;

use common::{PATIENCE, companion::Companion, moto::Moto};

fn companion(moto: &Moto, secret: &str) -> Companion {
    let (a, b) = (&moto.instances[0].0, &moto.instances[1].0);
    let config = format!(
        "{}[profiles.lab]\nbackend = \"aws\"\nvm = \"{a}\"\n\
         [profiles.class]\nbackend = \"aws\"\nby_client = {{ \"203.0.113.9\" = \"{b}\" }}\n",
        moto.backend()
    );
    Companion::start(&config, &[("aws-credentials", &moto.credentials(secret))])
}

#[test]
fn start_once_and_answer_the_private_address() {
    let moto = Moto::start(2);
    let api = companion(&moto, &moto.secret_access_key.clone());
    let (id, ip) = &moto.instances[0];
    let replies: Vec<_> = thread::scope(|s| {
        let asks: Vec<_> = (0..4).map(|_| s.spawn(|| api.start_vm("lab"))).collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.vm_ip(), ip);
    }
    assert_eq!(moto.actions("start", id), 1);
    assert_eq!(api.start_vm("lab").vm_ip(), ip);
    assert_eq!(
        moto.actions("start", id),
        1,
        "a running instance is not started again"
    );

    // One instance per client, from the table.
    let (other, other_ip) = &moto.instances[1];
    assert_eq!(api.start_vm("class").vm_ip(), other_ip);
    assert_eq!(moto.actions("start", other), 1);
    let stranger = api.post(
        "/start",
        common::companion::start_body("class", "198.51.100.1"),
    );
    assert_eq!(stranger.status, 404);
    assert_eq!(moto.actions("start", other), 1);
}

#[test]
fn a_wrong_secret_is_refused_with_ec2s_words() {
    let moto = Moto::start(2);
    let api = companion(&moto, "wrong-secret");
    let reply = api.start_vm("lab");
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(
        reply.error(),
        "AWS was not able to validate the provided access credentials (AuthFailure)"
    );
    assert_eq!(moto.actions("start", &moto.instances[0].0), 0);
    assert!(
        !api.log.lines().iter().any(|l| l.contains("wrong-secret")),
        "the secret was logged"
    );
}

#[test]
fn stop_stops_the_instance() {
    let moto = Moto::start(2);
    let api = companion(&moto, &moto.secret_access_key.clone());
    let (id, ip) = &moto.instances[0];
    assert_eq!(api.start_vm("lab").vm_ip(), ip);
    assert_eq!(api.stop_vm("lab", ip).status, 202);
    moto.wait_for_action("stop", id);
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    // By address, for a by-client profile stopped without a client address.
    let (other, other_ip) = &moto.instances[1];
    assert_eq!(api.start_vm("class").vm_ip(), other_ip);
    assert_eq!(api.stop_vm("class", other_ip).status, 202);
    moto.wait_for_action("stop", other);
}

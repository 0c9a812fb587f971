//! The EC2 backend against moto's EC2 server (PyPI `moto[server]`) with signature checking on. The
//! instances live in a VPC whose subnet is in 127.0.0.0/8, so every private address is loopback.

use testkit as common;

use std::thread;

use common::{PATIENCE, api_server::Companion, moto::Moto};

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
        common::api_server::start_body("class", "198.51.100.1"),
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

#[test]
fn hibernate_needs_an_instance_launched_for_it_and_the_next_start_resumes() {
    // Instance 0 was launched with hibernation enabled, instance 1 without.
    let moto = Moto::start_with_hibernation(2, &[0]);
    let ((ready, ready_ip), (plain, plain_ip)) = (&moto.instances[0], &moto.instances[1]);
    let config = |plain_extra: &str| {
        format!(
            "{}[profiles.lab]\nbackend = \"aws\"\nvm = \"{ready}\"\nstop_mode = \"hibernate\"\n\
             [profiles.plain]\nbackend = \"aws\"\nvm = \"{plain}\"\nstop_mode = \"hibernate\"\n{plain_extra}\n",
            moto.backend()
        )
    };
    let credentials = moto.credentials(&moto.secret_access_key);
    let api = Companion::start(&config(""), &[("aws-credentials", &credentials)]);
    assert_eq!(api.start_vm("lab").how(), "booted");
    // StopInstances returns at once: the proxy hears EC2's answer.
    assert_eq!(
        api.stop_vm("lab", ready_ip).stop_status(),
        (202, "suspending")
    );
    moto.wait_for_action("hibernate", ready);
    assert_eq!(
        api.stop_vm("lab", ready_ip).stop_status(),
        (200, "suspended")
    );
    let resumed = api.start_vm("lab");
    assert_eq!(
        (resumed.vm_ip(), resumed.how()),
        (ready_ip.as_str(), "resumed")
    );

    // Not launched for hibernation: refused, naming what it needs, and left running.
    assert_eq!(api.start_vm("plain").how(), "booted");
    let refused = api.stop_vm("plain", plain_ip);
    assert_eq!(refused.status, 409, "{refused:?}");
    assert!(
        refused.error().contains(
            "was not launched with hibernation enabled (HibernationOptions Configured=true"
        ),
        "{refused:?}"
    );
    assert_eq!(moto.actions("stop", plain), 0);
    drop(api);

    // Unless the profile allows a plain stop instead.
    let api = Companion::start(
        &config("if_suspend_fails = \"shutdown\""),
        &[("aws-credentials", &credentials)],
    );
    assert_eq!(
        api.stop_vm("plain", plain_ip).stop_status(),
        (202, "stopping")
    );
    moto.wait_for_action("stop", plain);
    assert_eq!(moto.actions("hibernate", plain), 0);
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    assert_eq!(api.count("shutting it down instead"), 1);
    assert_eq!(api.start_vm("plain").how(), "booted");
}

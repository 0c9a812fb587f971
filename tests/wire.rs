//! What crosses the client's socket, byte for byte: half-closes, and nothing but relayed bytes or our
//! disconnect message, even when stderr is the client's socket.

use testkit as common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    proxy::{Handover, Proxy},
    ssh::assert_echo,
    vm::Vm,
};
use ssh_on_demand::wire::{self as disconnect, binary_packet, put_string};

const CLIENT_IDENTIFICATION: &[u8] = b"SSH-2.0-wire_test\r\n";
const SSH_MSG_KEXINIT: u8 = 20;
const SSH_MSG_KEX_ECDH_INIT: u8 = 30;
const SSH_MSG_KEX_ECDH_REPLY: u8 = 31;

fn connect(proxy: &Proxy) -> TcpStream {
    let stream = TcpStream::connect(proxy.addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Connects as an SSH client would, and checks that everything it receives until the proxy closes is our
/// disconnect message with `reason`.
fn assert_told_exactly(proxy: &Proxy, reason: &str) {
    let mut stream = connect(proxy);
    stream.write_all(CLIENT_IDENTIFICATION).unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&received),
        String::from_utf8_lossy(&disconnect::message(reason))
    );
}

/// Reads one line, LF included.
fn read_line(stream: &mut TcpStream) -> Vec<u8> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        stream.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    line
}

/// The message numbers of the unencrypted binary packets in `bytes`.
fn message_numbers(mut bytes: &[u8]) -> Vec<u8> {
    let mut numbers = Vec::new();
    while bytes.len() >= 6 {
        let length = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        numbers.push(bytes[5]);
        bytes = &bytes[(4 + length).min(bytes.len())..];
    }
    numbers
}

fn name_lists(payload: &mut Vec<u8>, lists: &[&str]) {
    for list in lists {
        put_string(payload, list.as_bytes());
    }
}

/// A client that says all it has to say and shuts its sending side must still get the VM's answer: EOF one way
/// is passed on as a half-close while the other way keeps flowing. Here the answer is sshd's key exchange
/// reply, which sshd only sends after reading the client's last packet, sent right before the shutdown.
#[test]
fn half_closed_client_still_gets_the_reply() {
    let vm = Vm::new();
    vm.start();
    let api = StartApi::pointing_at(&vm);
    let proxy = Proxy::start(&api.url());
    let mut stream = connect(&proxy);
    stream.write_all(CLIENT_IDENTIFICATION).unwrap();
    assert!(read_line(&mut stream).starts_with(b"SSH-2.0-OpenSSH"));

    let mut kexinit = vec![SSH_MSG_KEXINIT];
    kexinit.extend_from_slice(&[7u8; 16]); // cookie
    name_lists(
        &mut kexinit,
        &[
            "curve25519-sha256",
            "ssh-ed25519",
            "aes128-ctr",
            "aes128-ctr",
            "hmac-sha2-256",
            "hmac-sha2-256",
            "none",
            "none",
            "",
            "",
        ],
    );
    kexinit.extend_from_slice(&[0, 0, 0, 0, 0]); // first_kex_packet_follows, reserved
    let mut ecdh_init = vec![SSH_MSG_KEX_ECDH_INIT];
    let mut public_key = [0u8; 32];
    public_key[0] = 9; // the curve25519 base point: a valid public key
    put_string(&mut ecdh_init, &public_key);

    stream
        .write_all(&[binary_packet(&kexinit), binary_packet(&ecdh_init)].concat())
        .unwrap();
    stream.shutdown(Shutdown::Write).unwrap();

    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    let numbers = message_numbers(&rest);
    assert!(
        numbers.contains(&SSH_MSG_KEX_ECDH_REPLY),
        "no key exchange reply after the half-close; got messages {numbers:?}"
    );
}

/// With stderr on the client's socket (a unit without `StandardError=journal`) and debug logging, the client
/// gets exactly our identification and disconnect packet: not one byte of log.
#[test]
fn refused_client_gets_exactly_the_disconnect_message() {
    let api = StartApi::serve(|_| Answer::reply(403, "text/plain", "not today"));
    let proxy = Proxy::builder(&api.url())
        .handover(Handover::InetdWithStderrOnSocket)
        .start();
    assert_told_exactly(
        &proxy,
        "VM failed to start: the start API answered 403 Forbidden: not today",
    );
}

/// The same unit, relaying: the first bytes the client gets are the VM's, and a real login works.
#[test]
fn relayed_client_gets_only_the_vms_bytes() {
    let vm = Vm::new();
    let api = StartApi::booting(&vm, std::time::Duration::from_millis(100));
    let proxy = Proxy::builder(&api.url())
        .handover(Handover::InetdWithStderrOnSocket)
        .start();

    let mut stream = connect(&proxy);
    stream.write_all(CLIENT_IDENTIFICATION).unwrap();
    let line = read_line(&mut stream);
    assert!(
        line.starts_with(b"SSH-2.0-OpenSSH"),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    drop(stream);

    assert_echo(proxy.addr, &vm.client_key(), "clean");
}

/// A broken command line in the unit, with stderr on the socket: clap's usage text must not reach the client,
/// who is told the host is misconfigured instead.
#[test]
fn bad_command_line_is_not_shown_to_the_client() {
    let proxy = Proxy::builder("http://127.0.0.1:9/")
        .arg("--no-such-flag")
        .handover(Handover::InetdWithStderrOnSocket)
        .start();
    assert_told_exactly(
        &proxy,
        "ssh-on-demand is misconfigured on this host; its operator can read why in the journal",
    );
}

//! The relay on real loopback sockets: the zero-copy path really taken (its pipes seen in /proc), exact bytes
//! and counts around the pipe's size, stalled readers, resets, in both kinds of tokio runtime.

use testkit as common;

use std::{
    fs::{self, File},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::PATIENCE;
use ssh_on_demand::relay::{PIPE_SIZE, RelayError, Transferred, relay};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    runtime::{Builder, Runtime},
};

/// The test that counts this process's pipes must not see another test's.
static ALONE: Mutex<()> = Mutex::new(());

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Bytes that differ from position to position, so that a lost, doubled or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Client and VM ends of a relay running in a task: (client, vm, relay task).
type Relayed = (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(Transferred, Result<(), RelayError>)>,
);

async fn relayed(to_vm: &'static [u8], to_client: &'static [u8]) -> Relayed {
    let (client, mut client_side) = pair().await;
    let (mut vm_side, vm) = pair().await;
    let task =
        tokio::spawn(async move { relay(&mut client_side, &mut vm_side, to_vm, to_client).await });
    (client, vm, task)
}

/// Sends `out` and half-closes, while reading everything the other side sends until its half-close.
async fn exchange(stream: TcpStream, out: Vec<u8>) -> Vec<u8> {
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&out).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    read.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    got
}

fn sizes_around_the_pipe_size(runtime: Runtime) {
    let sizes = [
        0,
        1,
        65_535,
        65_536,
        65_537,
        PIPE_SIZE - 1,
        PIPE_SIZE,
        PIPE_SIZE + 1,
        3 * PIPE_SIZE + 7,
    ];
    runtime.block_on(async {
        for (i, &size) in sizes.iter().enumerate() {
            let (up, down) = (pattern(size, i as u8), pattern(size + 3, !(i as u8)));
            let (client, vm, task) = relayed(b"SSH-2.0-c\r\n", b"SSH-2.0-vm\r\n").await;
            let (at_vm, at_client) =
                tokio::join!(exchange(vm, down.clone()), exchange(client, up.clone()));
            assert!(
                at_vm == [b"SSH-2.0-c\r\n".as_slice(), &up].concat(),
                "{size} up"
            );
            assert!(
                at_client == [b"SSH-2.0-vm\r\n".as_slice(), &down].concat(),
                "{size} down"
            );
            let (transferred, result) = task.await.unwrap();
            result.unwrap();
            assert_eq!(
                transferred,
                Transferred {
                    to_vm: 11 + size as u64,
                    to_client: 12 + size as u64 + 3
                }
            );
        }
    });
}

#[test]
fn sizes_around_the_pipe_size_arrive_whole_with_exact_counts() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    sizes_around_the_pipe_size(current_thread());
}

#[test]
fn sizes_around_the_pipe_size_arrive_whole_in_a_multi_thread_runtime() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    sizes_around_the_pipe_size(multi_thread());
}

/// The sizes of the pipes this process holds, by pipe.
fn pipes() -> Vec<(String, usize)> {
    let mut found: Vec<(String, usize)> = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.display().to_string();
        if !target.starts_with("pipe:") || found.iter().any(|(t, _)| *t == target) {
            continue;
        }
        // Opening the fd's /proc entry gives another handle on the same pipe, which F_GETPIPE_SZ reads.
        let Ok(pipe) = File::open(entry.path()) else {
            continue;
        };
        found.push((target, rustix::pipe::fcntl_getpipe_size(&pipe).unwrap()));
    }
    found
}

#[test]
fn bulk_goes_through_one_pipe_per_direction_grown_to_the_pipe_size() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let max: usize = fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let before = pipes();
    current_thread().block_on(async {
        let (client, vm, task) = relayed(b"", b"").await;
        let relay_pipes = || {
            pipes()
                .into_iter()
                .filter(|p| !before.contains(p))
                .collect::<Vec<_>>()
        };
        // More than loopback buffers hold (a few MiB), so the relay cannot finish before anyone reads.
        let bulk = 32 * 1024 * 1024;
        let (up, down) = (pattern(bulk, 1), pattern(bulk, 2));
        let (client_read, mut client_write) = client.into_split();
        let (vm_read, mut vm_write) = vm.into_split();
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let writers = tokio::spawn(async move {
            tokio::join!(
                client_write.write_all(&up_sent),
                vm_write.write_all(&down_sent)
            )
        });
        // Nobody reads yet: each pipe fills, which makes the relay grow it.
        let started = Instant::now();
        loop {
            let sizes: Vec<usize> = relay_pipes().iter().map(|(_, size)| *size).collect();
            if sizes.len() == 2 && sizes.iter().all(|&size| size == PIPE_SIZE.min(max)) {
                break;
            }
            assert!(started.elapsed() < PATIENCE, "relay pipes: {sizes:?}");
            tokio::time::sleep(Duration::from_millis(5)).await; // polling the fd table
        }
        let mut at_vm = vec![0; bulk];
        let mut at_client = vec![0; bulk];
        let (mut vm_read, mut client_read) = (vm_read, client_read);
        let (a, b) = tokio::join!(
            vm_read.read_exact(&mut at_vm),
            client_read.read_exact(&mut at_client)
        );
        a.unwrap();
        b.unwrap();
        assert!(at_vm == up && at_client == down);
        let (client_written, vm_written) = writers.await.unwrap();
        client_written.unwrap();
        vm_written.unwrap();
        drop((client_read, vm_read));
        let (transferred, _) = task.await.unwrap();
        assert_eq!(transferred.to_vm, bulk as u64);
        assert_eq!(transferred.to_client, bulk as u64);
    });
}

#[test]
fn small_writes_to_a_stalled_reader_lose_nothing() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    current_thread().block_on(async {
        let (client, mut vm, task) = relayed(b"", b"").await;
        client.set_nodelay(true).unwrap();
        let up = pattern(4 * 1024 * 1024, 7);
        let sent = up.clone();
        let written = Arc::new(AtomicUsize::new(0));
        let progress = written.clone();
        let writer = tokio::spawn(async move {
            let mut client = client;
            // Many small segments. (On a network each could take a pipe slot of its own, filling the pipe with
            // fewer bytes than its size; loopback coalesces them, so that case is not forced here.)
            for chunk in sent.chunks(100) {
                client.write_all(chunk).await.unwrap();
                progress.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            client.shutdown().await.unwrap();
            client
        });
        // The VM reads nothing until half a MiB is stuck in buffers and the relay's pipe: the relay must
        // not lose track of what is in its pipe, nor stop reading once it drained.
        let started = Instant::now();
        while written.load(Ordering::Relaxed) < 512 * 1024 {
            assert!(started.elapsed() < PATIENCE, "the relay took too little in");
            tokio::time::sleep(Duration::from_millis(5)).await; // polling the writer's progress
        }
        let mut got = Vec::new();
        vm.read_to_end(&mut got).await.unwrap();
        assert!(got == up);
        drop(vm);
        drop(writer.await.unwrap());
        let (transferred, _) = task.await.unwrap();
        assert_eq!(transferred.to_vm, up.len() as u64);
    });
}

#[test]
fn a_reset_from_the_vm_ends_the_relay_with_an_error() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    current_thread().block_on(async {
        let (mut client, vm, task) = relayed(b"", b"SSH-2.0-vm\r\n").await;
        let mut line = [0u8; 12];
        client.read_exact(&mut line).await.unwrap();
        // SO_LINGER 0: close() sends an RST, as a VM that is destroyed mid-session.
        socket2::SockRef::from(&vm)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(vm);
        let (transferred, result) = task.await.unwrap();
        assert!(result.is_err(), "{result:?}");
        assert_eq!(transferred.to_client, 12);
    });
}

/* The raw relay scenario's floor: the least work a user-space TCP relay can do. One connection on fd 0 (as
 * with `systemd-socket-activate -a --inetd`), relayed to HOST PORT by two threads, each a blocking loop of
 * splice(2) socket -> pipe (1 MiB) -> socket, then a half-close. No event loop, no timeouts, no byte counts,
 * no error reporting: not a product, only the bound a relay can approach. If this moves no more than
 * systemd-socket-proxyd, neither can any relay on that machine; what limits the transfer is the kernel's TCP
 * work and the endpoints.
 *
 *   cc -O2 -pthread -o splice_floor splice_floor.c; splice_floor HOST PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

struct direction {
    int from, to;
};

static void *pump(void *arg) {
    struct direction *d = arg;
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0)
        exit(1);
    fcntl(pipe_fds[1], F_SETPIPE_SZ, 1 << 20);
    for (;;) {
        ssize_t in = splice(d->from, NULL, pipe_fds[1], NULL, 1 << 20, SPLICE_F_MOVE);
        if (in <= 0)
            break;
        while (in > 0) {
            ssize_t out = splice(pipe_fds[0], NULL, d->to, NULL, (size_t)in, SPLICE_F_MOVE);
            if (out <= 0)
                exit(1);
            in -= out;
        }
    }
    shutdown(d->to, SHUT_WR);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    struct sockaddr_in vm = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (inet_pton(AF_INET, argv[1], &vm.sin_addr) != 1 || connect(fd, (struct sockaddr *)&vm, sizeof vm) != 0)
        return 1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(0, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct direction up = {0, fd}, down = {fd, 0};
    pthread_t thread;
    if (pthread_create(&thread, NULL, pump, &down) != 0)
        return 1;
    pump(&up);
    pthread_join(thread, NULL);
    return 0;
}

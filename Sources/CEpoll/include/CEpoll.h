#ifndef CEPOLL_H
#define CEPOLL_H

// What Swift cannot import from <sys/epoll.h> (the packed epoll_event and its union) and the few calls the
// event loop makes with Linux flags: a plain struct per ready descriptor, and thin wrappers.

#include <stdint.h>
#include <sys/socket.h>

#define CEPOLL_IN 0x001u
#define CEPOLL_OUT 0x004u
#define CEPOLL_ERR 0x008u
#define CEPOLL_HUP 0x010u
#define CEPOLL_RDHUP 0x2000u
#define CEPOLL_ET 0x80000000u

typedef struct {
    uint32_t events;
    uint64_t data;
} cepoll_event;

/// epoll_create1(EPOLL_CLOEXEC).
int cepoll_create(void);
/// A non-blocking, close-on-exec eventfd that wakes the loop.
int cepoll_eventfd(void);
/// epoll_ctl with ADD (op 1), DEL (op 2) or MOD (op 3).
int cepoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data);
/// Up to `max` (at most 256) ready descriptors; waits up to `timeout_ns` nanoseconds (negative: without
/// limit). Returns the count, or -1 with errno.
int cepoll_wait(int epfd, cepoll_event *out, int max, int64_t timeout_ns);
/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC.
int cepoll_accept(int fd, struct sockaddr_storage *address, socklen_t *length);
/// A socket of `family` and SOCK_STREAM, non-blocking and close-on-exec.
int cepoll_stream_socket(int family);
/// A socket of `family` and SOCK_DGRAM, non-blocking and close-on-exec.
int cepoll_datagram_socket(int family);
/// sendmsg of `count` iovecs with MSG_NOSIGNAL (a peer gone is an error, not SIGPIPE).
long cepoll_sendv(int fd, const struct iovec *vectors, int count);

/// Names the calling thread (at most 15 characters).
void cepoll_set_thread_name(const char *name);

#endif

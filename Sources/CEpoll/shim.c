#define _GNU_SOURCE
#include "CEpoll.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <pthread.h>
#include <time.h>

int cepoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int cepoll_eventfd(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }

int cepoll_ctl(int epfd, int op, int fd, uint32_t events, uint64_t data) {
    struct epoll_event event;
    event.events = events;
    event.data.u64 = data;
    return epoll_ctl(epfd, op, fd, &event);
}

int cepoll_wait(int epfd, cepoll_event *out, int max, int64_t timeout_ns) {
    struct epoll_event events[256];
    if (max > 256) max = 256;
    int count;
    if (timeout_ns < 0) {
        count = epoll_wait(epfd, events, max, -1);
    } else if (timeout_ns == 0) {
        count = epoll_wait(epfd, events, max, 0);
    } else {
        struct timespec limit = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
        count = epoll_pwait2(epfd, events, max, &limit, NULL);
        if (count < 0 && errno == ENOSYS) {
            // Before Linux 5.11: whole milliseconds, rounded up so a timer never fires early.
            count = epoll_wait(epfd, events, max, (int)((timeout_ns + 999999) / 1000000));
        }
    }
    for (int i = 0; i < count; i++) {
        out[i].events = events[i].events;
        out[i].data = events[i].data.u64;
    }
    return count;
}

int cepoll_accept(int fd, struct sockaddr_storage *address, socklen_t *length) {
    return accept4(fd, (struct sockaddr *)address, length, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int cepoll_stream_socket(int family) { return socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0); }

int cepoll_datagram_socket(int family) { return socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0); }

long cepoll_sendv(int fd, const struct iovec *vectors, int count) {
    struct msghdr message = {0};
    message.msg_iov = (struct iovec *)vectors;
    message.msg_iovlen = (size_t)count;
    return sendmsg(fd, &message, MSG_NOSIGNAL);
}

void cepoll_set_thread_name(const char *name) { pthread_setname_np(pthread_self(), name); }

#include <errno.h>
#ifdef __linux__
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#endif
#include "CTUN.h"

int ctun_name_size(void) {
#ifdef __linux__
    return IFNAMSIZ;
#else
    return 16;
#endif
}

int ctun_open(const char *requested, int multi_queue, int vnet_hdr, char *name_out, size_t name_out_len) {
#ifdef __linux__
    struct ifreq ifr;
    if (requested == NULL || strlen(requested) >= IFNAMSIZ || name_out_len < IFNAMSIZ) {
        return -EINVAL;
    }
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        return -errno;
    }
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | (multi_queue ? IFF_MULTI_QUEUE : 0) | (vnet_hdr ? IFF_VNET_HDR : 0);
    strncpy(ifr.ifr_name, requested, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    memset(name_out, 0, name_out_len);
    strncpy(name_out, ifr.ifr_name, IFNAMSIZ - 1);
    return fd;
#else
    (void)requested; (void)multi_queue; (void)vnet_hdr; (void)name_out; (void)name_out_len;
    return -ENOSYS;
#endif
}

int ctun_set_offload(int fd, int enabled) {
#ifdef __linux__
    unsigned long flags = enabled ? (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) : 0;
    if (ioctl(fd, TUNSETOFFLOAD, flags) < 0) {
        return -errno;
    }
    return 0;
#else
    (void)fd; (void)enabled;
    return -ENOSYS;
#endif
}

unsigned long long ctun_netns_inode(void) {
#ifdef __linux__
    struct stat st;
    if (stat("/proc/self/ns/net", &st) != 0) {
        return 0;
    }
    return (unsigned long long)st.st_ino;
#else
    return 0;
#endif
}

int ctun_open_address_watch(void) {
#ifdef __linux__
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        return -errno;
    }
    struct sockaddr_nl local;
    memset(&local, 0, sizeof(local));
    local.nl_family = AF_NETLINK;
    local.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    if (bind(fd, (struct sockaddr *)&local, sizeof(local)) < 0) {
        int saved = errno;
        close(fd);
        return -saved;
    }
    return fd;
#else
    return -ENOSYS;
#endif
}

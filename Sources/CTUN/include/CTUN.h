#ifndef CTUN_H
#define CTUN_H

#include <stddef.h>

/// Opens /dev/net/tun and attaches a TUN device (IFF_TUN | IFF_NO_PI: one read or write is one bare IP
/// packet). `requested` may be a name or a pattern such as "tunnel%d"; the kernel's chosen name is copied to
/// `name_out` (at least IFNAMSIZ bytes). With `multi_queue`, the device has one queue per descriptor
/// (IFF_MULTI_QUEUE): open it again by its name for each further queue. With `vnet_hdr` (IFF_VNET_HDR) each
/// read and write starts with a 10-byte struct virtio_net_hdr (the packet's segmentation and checksum
/// offload state). Returns the non-blocking, close-on-exec descriptor, or -errno.
int ctun_open(const char *requested, int multi_queue, int vnet_hdr, char *name_out, size_t name_out_len);

/// TUNSETOFFLOAD on a device opened with `vnet_hdr`: with `enabled` the kernel may hand it TCP segments of up
/// to 64 KiB with their checksum left to complete (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6), as to a virtual
/// machine's NIC; without, only finished packets of at most the MTU. Applies to the whole device. 0 or -errno.
int ctun_set_offload(int fd, int enabled);

/// The size a `name_out` buffer needs (IFNAMSIZ).
int ctun_name_size(void);

/// The inode of this process's network namespace (/proc/self/ns/net), or 0 when unknown: tells apart
/// namespaces that share one /run.
unsigned long long ctun_netns_inode(void);

/// Opens a non-blocking, close-on-exec rtnetlink socket subscribed to IPv4 and IPv6 address changes
/// (RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR): it turns readable whenever an address of this host is added or
/// removed. Returns the descriptor, or -errno.
int ctun_open_address_watch(void);
#endif

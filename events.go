//go:build linux

// events.go listens for the kernel's TCP socket destroy events: sock_diag
// broadcasts an inet_diag_msg to the multicast groups SKNLGRP_INET_TCP_DESTROY
// and SKNLGRP_INET6_TCP_DESTROY each time a TCP socket of this network
// namespace is freed, a fraction of a millisecond after it closed. The
// stopper recounts when one on the app's port arrives, instead of waiting for
// its next poll. An event only says "count again": the count decides.

package main

import (
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
)

// Group bits in sockaddr_nl.nl_groups: bit N-1 joins group N
// (SKNLGRP_INET_TCP_DESTROY = 1, SKNLGRP_INET6_TCP_DESTROY = 3).
const tcpDestroyGroups = 1<<(1-1) | 1<<(3-1)

// idiag_sport in struct inet_diag_msg, in network byte order.
const inetDiagSportOff = 4

// destroyEvents is a subscription to the destroy groups. The socket is
// non-blocking and read through Go's poller, so close ends a pending read.
type destroyEvents struct {
	f   *os.File
	rc  syscall.RawConn
	buf []byte
}

// subscribeDestroyEvents joins both destroy groups through a socket filter
// that keeps only the events of sockets whose local port is port, so that
// churn on the pod's other ports never fills the socket's buffer. It needs
// no privilege in the caller's own network namespace.
func subscribeDestroyEvents(port uint16) (*destroyEvents, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("sock_diag events socket: %w", err)
	}
	// The kernel sends each event in a packet of its own: nlmsghdr, then
	// inet_diag_msg. Classic BPF loads idiag_sport in network byte order.
	filter := []syscall.SockFilter{
		{Code: syscall.BPF_LD | syscall.BPF_H | syscall.BPF_ABS, K: nlmsgHdrLen + inetDiagSportOff},
		{Code: syscall.BPF_JMP | syscall.BPF_JEQ | syscall.BPF_K, Jf: 1, K: uint32(port)},
		{Code: syscall.BPF_RET | syscall.BPF_K, K: 0xffffffff}, // keep the packet
		{Code: syscall.BPF_RET | syscall.BPF_K, K: 0},          // drop it
	}
	if err := syscall.AttachLsf(fd, filter); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("sock_diag events: filtering port %d: %w", port, err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK, Groups: tcpDestroyGroups}); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("sock_diag events: joining the destroy groups: %w", err)
	}
	f := os.NewFile(uintptr(fd), "sock_diag destroy events")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("sock_diag events: %w", err)
	}
	return &destroyEvents{f: f, rc: rc, buf: make([]byte, 64<<10)}, nil
}

func (e *destroyEvents) close() { e.f.Close() }

// watchDestroys subscribes and watches in the background: wake gets a value
// when a socket on port was destroyed, stop ends the subscription, and
// failed is told if it ends for another reason (the stopper then polls).
func watchDestroys(port uint16, failed func(error)) (wake <-chan struct{}, stop func(), err error) {
	e, err := subscribeDestroyEvents(port)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan struct{}, 1)
	var stopped atomic.Bool
	go func() {
		if err := e.watch(ch); !stopped.Load() {
			failed(err)
		}
	}()
	return ch, func() { stopped.Store(true); e.close() }, nil
}

// watch sends on wake, without blocking, for each destroy event, and when
// the kernel dropped events for want of buffer space (ENOBUFS: one of them
// may have been ours). Messages not from the kernel (nl_pid 0) are ignored:
// any process in the pod may send to this socket. wake should have room for
// one: events that come while one is pending are the same news. watch
// returns when the subscription is closed or fails.
func (e *destroyEvents) watch(wake chan<- struct{}) error {
	for {
		var from syscall.Sockaddr
		var rerr error
		err := e.rc.Read(func(fd uintptr) bool {
			_, from, rerr = syscall.Recvfrom(int(fd), e.buf, 0)
			return rerr != syscall.EAGAIN
		})
		sender, _ := from.(*syscall.SockaddrNetlink)
		switch {
		case err != nil:
			return err
		case rerr == syscall.ENOBUFS, rerr == nil && sender != nil && sender.Pid == 0:
			notify(wake)
		case rerr != nil:
			return fmt.Errorf("sock_diag events: %w", rerr)
		}
	}
}

func notify(wake chan<- struct{}) {
	select {
	case wake <- struct{}{}:
	default:
	}
}

//go:build linux

// events.go listens for the kernel's TCP socket destroy events: sock_diag
// broadcasts an inet_diag_msg to the multicast groups SKNLGRP_INET_TCP_DESTROY
// and SKNLGRP_INET6_TCP_DESTROY each time a TCP socket of this network
// namespace is freed, a fraction of a millisecond after it closed. The
// stopper recounts when one on the app's port arrives, instead of waiting for
// its next poll. An event only says "count again": the count decides.

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
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
	buf []byte
}

// subscribeDestroyEvents joins both destroy groups. It needs no privilege
// in the caller's own network namespace.
func subscribeDestroyEvents() (*destroyEvents, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("sock_diag events socket: %w", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK, Groups: tcpDestroyGroups}); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("sock_diag events: joining the destroy groups: %w", err)
	}
	return &destroyEvents{f: os.NewFile(uintptr(fd), "sock_diag destroy events"), buf: make([]byte, 64<<10)}, nil
}

func (e *destroyEvents) close() { e.f.Close() }

// watchDestroys subscribes and watches in the background: wake gets a value
// when a socket on port was destroyed, stop ends the subscription, and
// failed is told if it ends for another reason (the stopper then polls).
func watchDestroys(port uint16, failed func(error)) (wake <-chan struct{}, stop func(), err error) {
	e, err := subscribeDestroyEvents()
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan struct{}, 1)
	go func() {
		if err := e.watch(port, ch); !errors.Is(err, os.ErrClosed) {
			failed(err)
		}
	}()
	return ch, e.close, nil
}

// watch sends on wake, without blocking, for each destroy event whose local
// port is port, and when the kernel dropped events for want of buffer space
// (ENOBUFS: one of them may have been ours). wake should have room for one:
// events that come while one is pending are the same news. watch returns
// when the subscription is closed or fails.
func (e *destroyEvents) watch(port uint16, wake chan<- struct{}) error {
	for {
		n, err := e.f.Read(e.buf)
		switch {
		case errors.Is(err, syscall.ENOBUFS):
			notify(wake)
			continue
		case err != nil:
			return err
		}
		if destroyedOnPort(e.buf[:n], port) {
			notify(wake)
		}
	}
}

func notify(wake chan<- struct{}) {
	select {
	case wake <- struct{}{}:
	default:
	}
}

// destroyedOnPort reports whether a datagram of destroy events holds one
// for a socket whose local port is port. Anything malformed counts as ours:
// a needless recount costs little, a missed one a whole interval.
func destroyedOnPort(b []byte, port uint16) bool {
	le := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return true
		}
		size, typ := le.Uint32(b[0:]), le.Uint16(b[4:])
		if size < nlmsgHdrLen || uint64(size) > uint64(len(b)) {
			return true
		}
		body := b[nlmsgHdrLen:size]
		b = b[min(len(b), int(size+3)&^3):]
		if typ != sockDiagByFamily {
			continue
		}
		if len(body) < inetDiagMsgLen || binary.BigEndian.Uint16(body[inetDiagSportOff:]) == port {
			return true
		}
	}
	return false
}

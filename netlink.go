//go:build linux

// netlink.go counts sockets through sock_diag (as ss does), filtered by state,
// port and peer in the kernel, and listens for its TCP destroy events, which
// wake the stopper when a call ends. Neither needs privilege in the pod.

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"time"
)

// From linux/sock_diag.h, linux/inet_diag.h and net/tcp_states.h.
const (
	netlinkSockDiag     = 4  // NETLINK_SOCK_DIAG
	sockDiagByFamily    = 20 // SOCK_DIAG_BY_FAMILY
	inetDiagReqBytecode = 1  // INET_DIAG_REQ_BYTECODE attribute
	inetDiagBcSGE       = 2  // INET_DIAG_BC_S_GE: local port >= operand
	inetDiagBcSLE       = 3  // INET_DIAG_BC_S_LE: local port <= operand
	inetDiagBcJmp       = 1  // INET_DIAG_BC_JMP: always takes "no"
	inetDiagBcDCond     = 8  // INET_DIAG_BC_D_COND: remote address in a prefix
	inetDiagInfo        = 2  // INET_DIAG_INFO attribute: struct tcp_info
	tcpEstablished      = 1
	tcpListen           = 10
	nlmsgHdrLen         = 16
	inetDiagReqV2Len    = 56
	inetDiagMsgLen      = 72
	inetDiagRqueueOff   = 56 // idiag_rqueue in struct inet_diag_msg, then idiag_wqueue
	inetDiagInodeOff    = 68 // idiag_inode
	inetDiagSportOff    = 4  // idiag_sport, in network byte order
	portTestLen         = 16 // the two port tests that open every filter
	hostcondLen         = 8  // struct inet_diag_hostcond before its address
	tcpiLastDataSentOff = 44 // in struct tcp_info, in ms; then last_data_recv
	tcpiLastDataRecvOff = 52
	// nl_groups bits: SKNLGRP_INET_TCP_DESTROY (1), SKNLGRP_INET6_TCP_DESTROY (3).
	tcpDestroyGroups = 1<<0 | 1<<2
)

var errNetlinkMalformed = errors.New("netlink: malformed sock_diag reply")

type netlinkSource struct {
	fd  int
	seq uint32
	req []byte // the request being sent
	bc  []byte // its filter program
	buf []byte
}

// newNetlinkSource opens the socket and makes one dump (of listeners: small),
// so that a kernel or sandbox that refuses sock_diag is found out here.
func newNetlinkSource() (*netlinkSource, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	tv := syscall.Timeval{Sec: 5} // a reply that never comes must not hang the stopper
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	n := &netlinkSource{fd: fd, buf: make([]byte, 64<<10)} // a dump comes in parts of 32 KiB at most
	if _, err := n.listeners(1); err != nil {
		n.close()
		return nil, err
	}
	return n, nil
}

func (n *netlinkSource) name() string { return "netlink" }

func (n *netlinkSource) close() { syscall.Close(n.fd) }

// established counts ESTABLISHED sockets on port; a second dump counts the excluded peers.
func (n *netlinkSource) established(port uint16, ex exclusions) (tally, error) {
	var t tally
	var ext uint8 // asks for tcp_info
	if ex.idle > 0 {
		ext = 1 << (inetDiagInfo - 1)
	}
	countCall := func(msg []byte) {
		if idle, ok := idleTime(msg); ext != 0 && ok && idle >= ex.idle {
			t.excludedIdle++
			return
		}
		t.calls++
	}
	n.bc = appendBytecode(n.bc[:0], port, ex.peers, false)
	if err := n.dump(1<<tcpEstablished, ext, countCall); err != nil {
		return tally{}, err
	}
	if len(ex.peers) > 0 {
		n.bc = appendBytecode(n.bc[:0], port, ex.peers, true)
		if err := n.dump(1<<tcpEstablished, 0, func([]byte) { t.excludedPeer++ }); err != nil {
			return tally{}, err
		}
	}
	return t, nil
}

func (n *netlinkSource) listeners(port uint16) ([]uint64, error) {
	var inodes []uint64
	n.bc = appendBytecode(n.bc[:0], port, nil, false)
	err := n.dump(1<<tcpListen, 0, func(msg []byte) {
		inodes = append(inodes, uint64(binary.NativeEndian.Uint32(msg[inetDiagInodeOff:])))
	})
	return inodes, err
}

// dump calls fn with each inet_diag_msg (and attributes) of IPv4 and IPv6 sockets passing n.bc.
func (n *netlinkSource) dump(states uint32, ext uint8, fn func(msg []byte)) error {
	for _, family := range []uint8{syscall.AF_INET, syscall.AF_INET6} {
		n.seq++
		n.buildRequest(family, states, ext)
		if _, err := syscall.Write(n.fd, n.req); err != nil {
			return fmt.Errorf("netlink sock_diag request: %w", err)
		}
		for done := false; !done; {
			// MSG_TRUNC: a reply larger than the buffer is reported, not cut.
			size, _, err := syscall.Recvfrom(n.fd, n.buf, syscall.MSG_TRUNC)
			switch {
			case err == syscall.EINTR: // SO_RCVTIMEO stops the kernel restarting it
				continue
			case err != nil:
				return fmt.Errorf("netlink sock_diag reply: %w", err)
			case size > len(n.buf):
				return fmt.Errorf("%w: a %d-byte reply", errNetlinkMalformed, size)
			}
			if done, err = parseDiagReply(n.buf[:size], n.seq, fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// buildRequest fills n.req: nlmsghdr, inet_diag_req_v2, and n.bc.
func (n *netlinkSource) buildRequest(family uint8, states uint32, ext uint8) {
	const head = nlmsgHdrLen + inetDiagReqV2Len + 4
	n.req = append(n.req[:0], make([]byte, head)...)
	n.req = append(n.req, n.bc...)
	b, ne := n.req, binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], sockDiagByFamily)
	ne.PutUint16(b[6:], syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP)
	ne.PutUint32(b[8:], n.seq)
	r := b[nlmsgHdrLen:]
	r[0], r[1], r[2] = family, syscall.IPPROTO_TCP, ext
	ne.PutUint32(r[4:], states)
	a := r[inetDiagReqV2Len:]
	ne.PutUint16(a[0:], uint16(4+len(n.bc)))
	ne.PutUint16(a[2:], inetDiagReqBytecode)
}

// appendBytecode appends the filter (inet_diag_bc_run): local port is port
// (">= && <=": S_EQ needs Linux 4.16), remote in none of peers (inPeers: in one).
// Each op is {code, yes, no}: the kernel moves on by "yes" bytes when the test
// holds, else by "no"; landing on the end accepts, 4 bytes past it rejects.
// JMP always takes "no". An IPv4 D_COND also matches IPv4-mapped remotes.
func appendBytecode(b []byte, port uint16, peers []netip.Prefix, inPeers bool) []byte {
	total := portTestLen
	for _, p := range peers {
		total += hostcondOpLen(p) + 4 // the test and a JMP after it
	}
	if inPeers && len(peers) > 0 {
		total -= 4 // the last test needs no JMP
	}
	start := len(b)
	left := func() int { return total - (len(b) - start) } // bytes from here to the end
	b = appendOp(b, inetDiagBcSGE, 8, uint16(left()+4))
	b = appendOp(b, 0, 0, port)
	b = appendOp(b, inetDiagBcSLE, 8, uint16(left()+4))
	b = appendOp(b, 0, 0, port)
	for i, p := range peers {
		size := hostcondOpLen(p)
		// Not in p: on to the next test; past the last, accept (inPeers: reject).
		b = appendHostcond(b, p, uint8(size), uint16(size+4))
		if inPeers && i == len(peers)-1 {
			break // in p: "yes" lands on the end, accepted
		}
		// In p: the JMP rejects the socket, or with inPeers accepts it.
		jump := left()
		if !inPeers {
			jump += 4
		}
		b = appendOp(b, inetDiagBcJmp, 4, uint16(jump))
	}
	return b
}

func appendOp(b []byte, code, yes uint8, no uint16) []byte {
	b = append(b, code, yes, 0, 0)
	binary.NativeEndian.PutUint16(b[len(b)-2:], no)
	return b
}

// hostcondOpLen: the op, struct inet_diag_hostcond, the address.
func hostcondOpLen(p netip.Prefix) int { return 4 + hostcondLen + p.Addr().BitLen()/8 }

// appendHostcond appends a D_COND op: the remote address in p, any port.
func appendHostcond(b []byte, p netip.Prefix, yes uint8, no uint16) []byte {
	family := uint8(syscall.AF_INET6)
	if p.Addr().Is4() {
		family = syscall.AF_INET
	}
	b = appendOp(b, inetDiagBcDCond, yes, no)
	b = append(b, family, uint8(p.Bits()), 0, 0, 0xff, 0xff, 0xff, 0xff) // port -1: any
	return append(b, p.Addr().AsSlice()...)                              // network byte order
}

// idleTime is how long no data moved either way, from tcp_info; ok is false
// without one. Queued bytes make it 0 (to a zero window only probes go out).
// Not tcpi_last_ack_recv: keep-alive probes' ACKs renew it.
func idleTime(msg []byte) (idle time.Duration, ok bool) {
	ne := binary.NativeEndian
	if ne.Uint32(msg[inetDiagRqueueOff:]) > 0 || ne.Uint32(msg[inetDiagRqueueOff+4:]) > 0 {
		return 0, true
	}
	attrs := msg[inetDiagMsgLen:]
	for len(attrs) >= 4 {
		size, typ := int(ne.Uint16(attrs)), ne.Uint16(attrs[2:])
		if size < 4 || size > len(attrs) {
			return 0, false
		}
		if typ == inetDiagInfo {
			info := attrs[4:size]
			if len(info) < tcpiLastDataRecvOff+4 {
				return 0, false
			}
			ms := min(ne.Uint32(info[tcpiLastDataSentOff:]), ne.Uint32(info[tcpiLastDataRecvOff:]))
			return time.Duration(ms) * time.Millisecond, true
		}
		attrs = attrs[min(len(attrs), (size+3)&^3):]
	}
	return 0, false
}

// parseDiagReply walks one datagram, done at NLMSG_DONE or NLMSG_ERROR.
func parseDiagReply(b []byte, seq uint32, fn func(msg []byte)) (done bool, err error) {
	le := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen {
			return true, errNetlinkMalformed
		}
		size, typ, msgSeq := le.Uint32(b[0:]), le.Uint16(b[4:]), le.Uint32(b[8:])
		if size < nlmsgHdrLen || uint64(size) > uint64(len(b)) {
			return true, errNetlinkMalformed
		}
		body := b[nlmsgHdrLen:size]
		b = b[min(len(b), int(size+3)&^3):]
		switch {
		case msgSeq != seq: // left over from a dump cut short
		case typ == syscall.NLMSG_DONE:
			if len(body) >= 4 && int32(le.Uint32(body)) < 0 {
				return true, fmt.Errorf("netlink sock_diag dump: %w", syscall.Errno(-int32(le.Uint32(body))))
			}
			return true, nil
		case typ == syscall.NLMSG_ERROR:
			if len(body) < 4 {
				return true, errNetlinkMalformed
			}
			return true, fmt.Errorf("netlink sock_diag: %w", syscall.Errno(-int32(le.Uint32(body))))
		case typ == sockDiagByFamily:
			if len(body) < inetDiagMsgLen {
				return true, errNetlinkMalformed
			}
			fn(body)
		}
	}
	return false, nil
}

// destroyEvents is read through Go's poller, so that close ends a pending read.
type destroyEvents struct {
	f  *os.File
	rc syscall.RawConn
}

// subscribeDestroyEvents keeps only port's events: churn elsewhere must not fill the buffer.
func subscribeDestroyEvents(port uint16) (*destroyEvents, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("sock_diag events socket: %w", err)
	}
	// Each event comes alone, nlmsghdr then inet_diag_msg: sport is at a fixed offset.
	filter := []syscall.SockFilter{
		{Code: syscall.BPF_LD | syscall.BPF_H | syscall.BPF_ABS, K: nlmsgHdrLen + inetDiagSportOff},
		{Code: syscall.BPF_JMP | syscall.BPF_JEQ | syscall.BPF_K, Jf: 1, K: uint32(port)},
		{Code: syscall.BPF_RET | syscall.BPF_K, K: 0xffffffff}, // keep
		{Code: syscall.BPF_RET | syscall.BPF_K, K: 0},          // drop
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
	rc, _ := f.SyscallConn() // fails only for a nil *os.File
	return &destroyEvents{f: f, rc: rc}, nil
}

func (e *destroyEvents) close() { e.f.Close() }

// watchDestroys wakes when a socket on port ends; failed hears if the watch ends before stop.
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

// watch wakes, without blocking, on each event from the kernel (nl_pid 0:
// anyone in the pod may send here) and on ENOBUFS (a dropped event may be ours).
func (e *destroyEvents) watch(wake chan<- struct{}) error {
	buf := make([]byte, 64<<10)
	for {
		var from syscall.Sockaddr
		var rerr error
		err := e.rc.Read(func(fd uintptr) bool {
			_, from, rerr = syscall.Recvfrom(int(fd), buf, 0)
			return rerr != syscall.EAGAIN
		})
		sender, _ := from.(*syscall.SockaddrNetlink)
		switch {
		case err != nil:
			return err
		case rerr == syscall.ENOBUFS, rerr == nil && sender != nil && sender.Pid == 0:
			select {
			case wake <- struct{}{}:
			default: // one pending wake is the same news
			}
		case rerr != nil:
			return fmt.Errorf("sock_diag events: %w", rerr)
		}
	}
}

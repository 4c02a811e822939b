//go:build linux

// netlink.go counts sockets through sock_diag (as ss does), filtered by state
// and port in the kernel, and listens for its TCP destroy events, which wake
// the stopper when a call ends. Neither needs privilege in the pod.

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
	inetDiagInfo        = 2  // INET_DIAG_INFO attribute: struct tcp_info
	tcpEstablished      = 1
	tcpListen           = 10
	nlmsgHdrLen         = 16
	inetDiagReqV2Len    = 56
	portFilterLen       = 16 // the bytecode: two tests of the local port
	inetDiagMsgLen      = 72
	inetDiagSportOff    = 4  // idiag_sport, in network byte order
	inetDiagDstOff      = 24 // idiag_dst, in network byte order; IPv4 in its first 4 bytes
	inetDiagRqueueOff   = 56 // idiag_rqueue in struct inet_diag_msg, then idiag_wqueue
	inetDiagInodeOff    = 68 // idiag_inode
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

// established counts ESTABLISHED sockets on port, less the excluded peers and idle ones.
func (n *netlinkSource) established(port uint16, ex exclusions) (tally, error) {
	var t tally
	var ext uint8 // asks for tcp_info
	if ex.idle > 0 {
		ext = 1 << (inetDiagInfo - 1)
	}
	err := n.dump(port, 1<<tcpEstablished, ext, func(msg []byte) {
		if len(ex.peers) > 0 && ex.excludesPeer(diagRemote(msg)) {
			t.excludedPeer++
		} else if idle, ok := idleTime(msg); ext != 0 && ok && idle >= ex.idle {
			t.excludedIdle++
		} else {
			t.calls++
		}
	})
	if err != nil {
		return tally{}, err
	}
	return t, nil
}

func (n *netlinkSource) listeners(port uint16) (inodes []uint64, err error) {
	err = n.dump(port, 1<<tcpListen, 0, func(msg []byte) {
		inodes = append(inodes, uint64(binary.NativeEndian.Uint32(msg[inetDiagInodeOff:])))
	})
	return inodes, err
}

// diagRemote is an inet_diag_msg's remote address (IPv4-mapped in an AF_INET6 one).
func diagRemote(msg []byte) netip.Addr {
	if msg[0] == syscall.AF_INET {
		return netip.AddrFrom4([4]byte(msg[inetDiagDstOff:]))
	}
	return netip.AddrFrom16([16]byte(msg[inetDiagDstOff:]))
}

// dump calls fn with each inet_diag_msg (and attributes) of IPv4 and IPv6 sockets on port.
func (n *netlinkSource) dump(port uint16, states uint32, ext uint8, fn func(msg []byte)) error {
	for _, family := range []uint8{syscall.AF_INET, syscall.AF_INET6} {
		n.buildRequest(family, states, ext, port)
		if _, err := syscall.Write(n.fd, n.req); err != nil {
			return fmt.Errorf("netlink sock_diag request: %w", err)
		}
		for done := false; !done; {
			size, _, err := syscall.Recvfrom(n.fd, n.buf, syscall.MSG_TRUNC) // a longer reply is reported, not cut
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

// buildRequest fills n.req: nlmsghdr, inet_diag_req_v2, and bytecode keeping local port port
// (">= && <=": S_EQ needs Linux 4.16). inet_diag_bc_run reads each op as {code, yes, no},
// moving on by "yes" bytes when its test holds, else by "no": 4 bytes past the end rejects.
func (n *netlinkSource) buildRequest(family uint8, states uint32, ext uint8, port uint16) {
	n.seq++
	n.req = append(n.req[:0], make([]byte, nlmsgHdrLen+inetDiagReqV2Len+4+portFilterLen)...)
	b, ne := n.req, binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], sockDiagByFamily)
	ne.PutUint16(b[6:], syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP)
	ne.PutUint32(b[8:], n.seq)
	r := b[nlmsgHdrLen:]
	r[0], r[1], r[2] = family, syscall.IPPROTO_TCP, ext
	ne.PutUint32(r[4:], states)
	a := r[inetDiagReqV2Len:]
	ne.PutUint16(a[0:], 4+portFilterLen)
	ne.PutUint16(a[2:], inetDiagReqBytecode)
	for i, code := range []uint8{inetDiagBcSGE, inetDiagBcSLE} {
		op := a[4+8*i:]
		op[0], op[1] = code, 8
		ne.PutUint16(op[2:], uint16(portFilterLen-8*i+4))
		ne.PutUint16(op[6:], port) // the operand, an op {0, 0, port}
	}
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
		if size < 4 || size > len(attrs) || typ == inetDiagInfo && size < 4+tcpiLastDataRecvOff+4 {
			return 0, false
		}
		if typ == inetDiagInfo {
			info := attrs[4:size]
			ms := min(ne.Uint32(info[tcpiLastDataSentOff:]), ne.Uint32(info[tcpiLastDataRecvOff:]))
			return time.Duration(ms) * time.Millisecond, true
		}
		attrs = attrs[min(len(attrs), (size+3)&^3):]
	}
	return 0, false
}

// parseDiagReply walks one datagram, done at NLMSG_DONE or NLMSG_ERROR.
func parseDiagReply(b []byte, seq uint32, fn func(msg []byte)) (done bool, err error) {
	ne := binary.NativeEndian
	for len(b) > 0 {
		if len(b) < nlmsgHdrLen || ne.Uint32(b) < nlmsgHdrLen || uint64(ne.Uint32(b)) > uint64(len(b)) {
			return true, errNetlinkMalformed
		}
		size, typ, msgSeq := int(ne.Uint32(b[0:])), ne.Uint16(b[4:]), ne.Uint32(b[8:])
		body := b[nlmsgHdrLen:size]
		b = b[min(len(b), (size+3)&^3):]
		switch {
		case msgSeq != seq: // left over from a dump cut short
		case typ == syscall.NLMSG_DONE && (len(body) < 4 || int32(ne.Uint32(body)) >= 0):
			return true, nil
		case typ == syscall.NLMSG_DONE, typ == syscall.NLMSG_ERROR: // a negative errno
			if len(body) < 4 {
				return true, errNetlinkMalformed
			}
			return true, fmt.Errorf("netlink sock_diag: %w", syscall.Errno(-int32(ne.Uint32(body))))
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
	return ch, func() { stopped.Store(true); e.f.Close() }, nil
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

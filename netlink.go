//go:build linux

// netlink.go counts sockets through the kernel's sock_diag netlink interface
// (NETLINK_SOCK_DIAG, the one ss uses). The kernel tests the state and the
// local port itself, so only matching sockets cross into user space: at tens
// of thousands of connections this is several times cheaper than formatting
// and parsing /proc/net/tcp. Like /proc, a dump that spans several replies is
// no snapshot (the stopper reads a zero twice). It needs no privilege in the
// caller's own network namespace.

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
)

// From linux/sock_diag.h, linux/inet_diag.h and net/tcp_states.h.
const (
	netlinkSockDiag     = 4  // NETLINK_SOCK_DIAG
	sockDiagByFamily    = 20 // SOCK_DIAG_BY_FAMILY
	inetDiagReqBytecode = 1  // INET_DIAG_REQ_BYTECODE attribute
	inetDiagBcSGE       = 2  // INET_DIAG_BC_S_GE: local port >= operand
	inetDiagBcSLE       = 3  // INET_DIAG_BC_S_LE: local port <= operand
	tcpEstablished      = 1
	tcpListen           = 10

	nlmsgHdrLen      = 16
	inetDiagReqV2Len = 56
	inetDiagMsgLen   = 72
	inetDiagInodeOff = 68 // idiag_inode in struct inet_diag_msg
	bytecodeLen      = 16
	requestLen       = nlmsgHdrLen + inetDiagReqV2Len + 4 + bytecodeLen
)

var errNetlinkMalformed = errors.New("netlink: malformed sock_diag reply")

// netlinkSource keeps one socket and one buffer for all its dumps.
type netlinkSource struct {
	fd  int
	seq uint32
	req [requestLen]byte
	buf []byte
}

// newNetlinkSource opens the socket and makes one dump, so that a kernel or
// sandbox that refuses sock_diag is found out here, not mid-drain.
func newNetlinkSource() (*netlinkSource, error) {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, netlinkSockDiag)
	if err != nil {
		return nil, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	// A reply that never comes must not hang the stopper.
	tv := syscall.Timeval{Sec: 5}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("netlink sock_diag socket: %w", err)
	}
	// The kernel sends dumps in parts of at most 32 KiB.
	n := &netlinkSource{fd: fd, buf: make([]byte, 64<<10)}
	// LISTEN only: the kernel then skips the established table, so the
	// probe costs nothing however many connections there are.
	if err := n.dump(syscall.AF_INET, 1<<tcpListen, 1, func([]byte) {}); err != nil {
		n.close()
		return nil, err
	}
	return n, nil
}

func (n *netlinkSource) name() string { return "netlink" }

func (n *netlinkSource) close() { syscall.Close(n.fd) }

// established counts ESTABLISHED TCP sockets, IPv4 and IPv6, whose local
// port is port.
func (n *netlinkSource) established(port uint16) (int, error) {
	count := 0
	for _, family := range []uint8{syscall.AF_INET, syscall.AF_INET6} {
		if err := n.dump(family, 1<<tcpEstablished, port, func([]byte) { count++ }); err != nil {
			return 0, err
		}
	}
	return count, nil
}

// listeners returns the inodes of LISTEN sockets on port.
func (n *netlinkSource) listeners(port uint16) ([]uint64, error) {
	var inodes []uint64
	for _, family := range []uint8{syscall.AF_INET, syscall.AF_INET6} {
		err := n.dump(family, 1<<tcpListen, port, func(msg []byte) {
			inodes = append(inodes, uint64(binary.NativeEndian.Uint32(msg[inetDiagInodeOff:])))
		})
		if err != nil {
			return nil, err
		}
	}
	return inodes, nil
}

// dump asks for the TCP sockets of one family in the given states with
// local port port, and calls fn with each inet_diag_msg.
func (n *netlinkSource) dump(family uint8, states uint32, port uint16, fn func(msg []byte)) error {
	n.seq++
	n.buildRequest(family, states, port)
	if _, err := syscall.Write(n.fd, n.req[:]); err != nil {
		return fmt.Errorf("netlink sock_diag request: %w", err)
	}
	for {
		size, err := n.receive()
		if err != nil {
			return err
		}
		done, err := parseDiagReply(n.buf[:size], n.seq, fn)
		if done || err != nil {
			return err
		}
	}
}

// receive reads one datagram. MSG_TRUNC makes the kernel report a reply
// larger than the buffer instead of cutting it silently.
func (n *netlinkSource) receive() (int, error) {
	for {
		size, _, err := syscall.Recvfrom(n.fd, n.buf, syscall.MSG_TRUNC)
		switch {
		case err == syscall.EINTR: // SO_RCVTIMEO stops the kernel restarting it
			continue
		case err != nil:
			return 0, fmt.Errorf("netlink sock_diag reply: %w", err)
		case size > len(n.buf):
			return 0, fmt.Errorf("%w: a %d-byte reply", errNetlinkMalformed, size)
		}
		return size, nil
	}
}

// buildRequest fills n.req: nlmsghdr, inet_diag_req_v2, and a bytecode
// filter "sport >= port && sport <= port" (S_EQ would need Linux 4.16).
func (n *netlinkSource) buildRequest(family uint8, states uint32, port uint16) {
	b, le := n.req[:], binary.NativeEndian
	le.PutUint32(b[0:], requestLen)
	le.PutUint16(b[4:], sockDiagByFamily)
	le.PutUint16(b[6:], syscall.NLM_F_REQUEST|syscall.NLM_F_DUMP)
	le.PutUint32(b[8:], n.seq)
	le.PutUint32(b[12:], 0)
	r := b[nlmsgHdrLen:]
	clear(r)
	r[0], r[1] = family, syscall.IPPROTO_TCP
	le.PutUint32(r[4:], states)
	a := r[inetDiagReqV2Len:]
	le.PutUint16(a[0:], 4+bytecodeLen)
	le.PutUint16(a[2:], inetDiagReqBytecode)
	// Each test is an op {code, yes, no} and an operand op holding the port.
	// "yes" jumps to the next test; "no" jumps past the end, which rejects.
	bc := a[4:]
	putOp(bc[0:], inetDiagBcSGE, 8, 20)
	putOp(bc[4:], 0, 0, port)
	putOp(bc[8:], inetDiagBcSLE, 8, 12)
	putOp(bc[12:], 0, 0, port)
}

func putOp(b []byte, code, yes uint8, no uint16) {
	b[0], b[1] = code, yes
	binary.NativeEndian.PutUint16(b[2:], no)
}

// parseDiagReply walks one datagram of netlink messages. It reports done at
// NLMSG_DONE, and turns NLMSG_ERROR into an error. Messages of an older
// sequence number (from a dump cut short) are skipped.
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
		if msgSeq != seq {
			continue
		}
		switch typ {
		case syscall.NLMSG_DONE:
			if len(body) >= 4 && int32(le.Uint32(body)) < 0 {
				return true, fmt.Errorf("netlink sock_diag dump: %w", syscall.Errno(-int32(le.Uint32(body))))
			}
			return true, nil
		case syscall.NLMSG_ERROR:
			if len(body) < 4 {
				return true, errNetlinkMalformed
			}
			return true, fmt.Errorf("netlink sock_diag: %w", syscall.Errno(-int32(le.Uint32(body))))
		case sockDiagByFamily:
			if len(body) < inetDiagMsgLen {
				return true, errNetlinkMalformed
			}
			fn(body)
		}
	}
	return false, nil
}

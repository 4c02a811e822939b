//go:build linux

package main

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// TestSourcesAgree opens live dual-stack connections in this network
// namespace and checks that netlink and /proc count them alike.
func TestSourcesAgree(t *testing.T) {
	nl, err := newNetlinkSource()
	if err != nil {
		t.Fatalf("netlink sock_diag refused in this namespace: %v", err)
	}
	defer nl.close()
	ln, err := net.Listen("tcp", ":0") // dual-stack, as Go, Node and Java servers are
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	for i, addr := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.1", "::1", "::1"} {
		c, err := net.Dial("tcp", net.JoinHostPort(addr, strconv.Itoa(int(port))))
		if err != nil {
			t.Fatalf("client %d: %v", i, err)
		}
		defer c.Close()
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
	}
	proc := newProcSource()
	for name, src := range map[string]socketSource{"netlink": nl, "proc": proc} {
		if n, err := callsOf(src, exclusions{})(port); err != nil || n != 5 {
			t.Errorf("%s: established = %d, %v; want 5 (3 IPv4-mapped, 2 IPv6)", name, n, err)
		}
	}
	nlInodes, err1 := nl.listeners(port)
	procInodes, err2 := proc.listeners(port)
	if err1 != nil || err2 != nil || len(nlInodes) != 1 || !slices.Equal(nlInodes, procInodes) {
		t.Errorf("listener inodes: netlink %v (%v), proc %v (%v); want the same one", nlInodes, err1, procInodes, err2)
	}
}

// diagMessage builds one netlink message as the kernel sends it.
func diagMessage(typ uint16, seq uint32, body []byte) []byte {
	b := make([]byte, nlmsgHdrLen+len(body), nlmsgHdrLen+len(body)+3)
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint32(b[8:], seq)
	copy(b[nlmsgHdrLen:], body)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func errBody(errno syscall.Errno) []byte {
	b := make([]byte, 20)
	binary.NativeEndian.PutUint32(b, uint32(-int32(errno)))
	return b
}

func TestParseDiagReply(t *testing.T) {
	sock := make([]byte, inetDiagMsgLen)
	cat := func(parts ...[]byte) []byte { return slices.Concat(parts...) }
	tests := []struct {
		name    string
		reply   []byte
		count   int
		done    bool
		wantErr error
	}{
		{"two sockets, more to come", cat(diagMessage(sockDiagByFamily, 7, sock), diagMessage(sockDiagByFamily, 7, sock)), 2, false, nil},
		{"sockets then done", cat(diagMessage(sockDiagByFamily, 7, sock), diagMessage(syscall.NLMSG_DONE, 7, make([]byte, 4))), 1, true, nil},
		{"a stale dump's messages are skipped", cat(diagMessage(sockDiagByFamily, 6, sock), diagMessage(syscall.NLMSG_DONE, 7, make([]byte, 4))), 0, true, nil},
		{"kernel error", diagMessage(syscall.NLMSG_ERROR, 7, errBody(syscall.EINVAL)), 0, true, syscall.EINVAL},
		{"dump interrupted", diagMessage(syscall.NLMSG_DONE, 7, errBody(syscall.EINTR)[:4]), 0, true, syscall.EINTR},
		{"short socket message", diagMessage(sockDiagByFamily, 7, sock[:40]), 0, true, errNetlinkMalformed},
		{"length past the end", diagMessage(sockDiagByFamily, 7, sock)[:50], 0, true, errNetlinkMalformed},
		{"cut header", []byte{1, 2, 3}, 0, true, errNetlinkMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := 0
			done, err := parseDiagReply(tt.reply, 7, func([]byte) { n++ })
			if n != tt.count || done != tt.done || !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Fatalf("got %d sockets, done %v, err %v; want %d, %v, %v", n, done, err, tt.count, tt.done, tt.wantErr)
			}
		})
	}
}

// TestBuildRequest checks the filter program's layout against the kernel's
// rules (inet_diag_bc_audit): every op's "yes" moves to the next op, every
// "no" lands on an op, on the end (accept) or 4 past it (reject).
func TestBuildRequest(t *testing.T) {
	ne := binary.NativeEndian
	op := func(code, yes uint8, no uint16) []byte {
		b := []byte{code, yes, 0, 0}
		ne.PutUint16(b[2:], no)
		return b
	}
	// The codes as linux/inet_diag.h numbers them, not wsdrain's constants.
	const sGE, sLE, bytecode = 2, 3, 1
	want := slices.Concat(op(sGE, 8, 20), op(0, 0, 8080), op(sLE, 8, 12), op(0, 0, 8080))
	n := &netlinkSource{req: []byte{0xAA}}
	n.buildRequest(syscall.AF_INET6, 1<<tcpEstablished, 4, 8080)
	b := n.req
	if len(b) != nlmsgHdrLen+inetDiagReqV2Len+4+len(want) || ne.Uint32(b) != uint32(len(b)) || ne.Uint32(b[8:]) != n.seq {
		t.Fatalf("request of %d bytes, nlmsg_len %d, seq %d", len(b), ne.Uint32(b), ne.Uint32(b[8:]))
	}
	r := b[nlmsgHdrLen:]
	if r[0] != syscall.AF_INET6 || r[1] != syscall.IPPROTO_TCP || r[2] != 4 || ne.Uint32(r[4:]) != 1<<tcpEstablished {
		t.Errorf("inet_diag_req_v2 % x", r[:8])
	}
	attr := r[inetDiagReqV2Len:]
	if ne.Uint16(attr) != uint16(4+len(want)) || ne.Uint16(attr[2:]) != bytecode || !slices.Equal(attr[4:], want) {
		t.Fatalf("bytecode attribute\n got % x\nwant % x", attr[4:], want)
	}
}

// TestDiagRemote reads the remote address of IPv4 and IPv6 sockets' messages.
func TestDiagRemote(t *testing.T) {
	for _, want := range []string{"10.1.2.3", "::ffff:10.1.2.3", "fd00::7"} {
		a := netip.MustParseAddr(want)
		msg := make([]byte, inetDiagMsgLen)
		msg[0] = syscall.AF_INET6
		if a.Is4() {
			msg[0] = syscall.AF_INET
		}
		copy(msg[inetDiagDstOff:], a.AsSlice())
		copy(msg[inetDiagDstOff-16:], netip.MustParseAddr("fe80::1").AsSlice()[:16]) // idiag_src
		if got := diagRemote(msg); got != a {
			t.Errorf("diagRemote = %v, want %v", got, a)
		}
	}
}

// TestPeerAndIdleExclusionsLive counts, through this kernel, the sockets of
// live connections from three loopback addresses, IPv4-mapped and IPv6, and
// checks netlink and /proc leave out the same peers.
func TestPeerAndIdleExclusionsLive(t *testing.T) {
	nl, err := newNetlinkSource()
	if err != nil {
		t.Fatalf("netlink sock_diag refused in this namespace: %v", err)
	}
	defer nl.close()
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	dial := func(local, remote string) {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}}
		c, err := d.Dial("tcp", net.JoinHostPort(remote, strconv.Itoa(port)))
		if err != nil {
			t.Skipf("cannot dial from %s here: %v", local, err)
		}
		t.Cleanup(func() { c.Close() })
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
	}
	dial("127.0.0.2", "127.0.0.1") // IPv4-mapped on the dual-stack listener
	dial("127.0.0.2", "127.0.0.1")
	dial("127.0.0.3", "127.0.0.1")
	dial("::1", "::1")
	tests := []struct {
		name string
		ex   exclusions
		want tally
	}{
		{"nothing left out", exclusions{}, tally{calls: 4}},
		{"one IPv4 host matches its mapped remote", peerExclusions("127.0.0.3/32"), tally{calls: 3, excludedPeer: 1}},
		{"an IPv4 network", peerExclusions("127.0.0.2/31"), tally{calls: 1, excludedPeer: 3}},
		{"IPv6 and IPv4 together", peerExclusions("::1/128", "127.0.0.2/32"), tally{calls: 1, excludedPeer: 3}},
		{"the mapped form, as IPv6", peerExclusions("::ffff:127.0.0.0/120"), tally{calls: 1, excludedPeer: 3}},
		{"no match", peerExclusions("10.0.0.0/8", "fd00::/8"), tally{calls: 4}},
	}
	proc := newProcSource()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for name, src := range map[string]socketSource{"netlink": nl, "proc": proc} {
				if got, err := src.established(uint16(port), tt.ex); err != nil || got != tt.want {
					t.Errorf("%s: %+v, %v; want %+v", name, got, err, tt.want)
				}
			}
		})
	}
	t.Run("as many networks as the flags allow", func(t *testing.T) {
		var ex exclusions
		for i := range maxPeers {
			ex.peers = append(ex.peers, netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfd, byte(i)}), 16))
		}
		if got, err := nl.established(uint16(port), ex); err != nil || got != (tally{calls: 4}) {
			t.Errorf("%d IPv6 networks: %+v, %v; want 4 calls", maxPeers, got, err)
		}
	})
	t.Run("idle", func(t *testing.T) {
		if got, err := nl.established(uint16(port), exclusions{idle: time.Hour}); err != nil || got != (tally{calls: 4}) {
			t.Errorf("idle for an hour: %+v, %v; want 4 calls", got, err)
		}
		time.Sleep(20 * time.Millisecond)
		if got, err := nl.established(uint16(port), exclusions{idle: 10 * time.Millisecond}); err != nil || got != (tally{excludedIdle: 4}) {
			t.Errorf("idle for 10ms: %+v, %v; want 4 idle", got, err)
		}
	})
}

// tcpInfoMessage is an inet_diag_msg followed by attributes, the tcp_info
// one saying data was last sent sentMs and received recvMs ago.
func tcpInfoMessage(sentMs, recvMs uint32, infoLen int) []byte {
	ne := binary.NativeEndian
	msg := make([]byte, inetDiagMsgLen)
	shutdown := []byte{5, 0, 8, 0, 0, 0, 0, 0} // INET_DIAG_SHUTDOWN, 1 byte, padded
	info := make([]byte, 4+infoLen)
	ne.PutUint16(info, uint16(len(info)))
	ne.PutUint16(info[2:], inetDiagInfo)
	if infoLen >= tcpiLastDataRecvOff+4 {
		ne.PutUint32(info[4+tcpiLastDataSentOff:], sentMs)
		ne.PutUint32(info[4+tcpiLastDataRecvOff:], recvMs)
	}
	return slices.Concat(msg, shutdown, info)
}

func TestIdleTime(t *testing.T) {
	tests := []struct {
		name   string
		msg    []byte
		want   time.Duration
		wantOK bool
	}{
		{"received last", tcpInfoMessage(9000, 250, 232), 250 * time.Millisecond, true},
		{"sent last", tcpInfoMessage(20, 3000, 232), 20 * time.Millisecond, true},
		{"idle both ways", tcpInfoMessage(61000, 60000, 232), time.Minute, true},
		{"an old kernel's shorter tcp_info", tcpInfoMessage(5, 7, 104), 5 * time.Millisecond, true},
		{"tcp_info cut before the times", tcpInfoMessage(5, 7, 40), 0, false},
		{"no tcp_info", make([]byte, inetDiagMsgLen), 0, false},
		{"attribute longer than the message", tcpInfoMessage(5, 7, 232)[:inetDiagMsgLen+8+40], 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := idleTime(tt.msg)
			if got != tt.want || ok != tt.wantOK {
				t.Fatalf("idleTime = %v, %v; want %v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

// TestIdleCountsCallsWithBytesQueued: a call whose app is still sending to a
// caller that stopped reading (its window is zero, so the kernel sends only
// probes and no data moves) is a call, and so is one whose app has not read
// what the caller sent; a connection with nothing queued is idle.
func TestIdleCountsCallsWithBytesQueued(t *testing.T) {
	nl, err := newNetlinkSource()
	if err != nil {
		t.Fatalf("netlink sock_diag refused in this namespace: %v", err)
	}
	defer nl.close()
	ln := listen(t)
	// A caller that stopped reading, with a small receive buffer: the kernel
	// would otherwise collapse its queue to make room, take in all the app
	// sent, and leave the app's socket with nothing queued.
	slow := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}
	c, err := slow.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	sending, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); sending.Close() })
	// Far more than the caller takes in, and less than the app's send
	// buffer holds: the write returns at once and the rest stays queued.
	sending.(*net.TCPConn).SetWriteBuffer(4 << 20)
	sending.SetWriteDeadline(time.Now().Add(10 * time.Second))
	if _, err := sending.Write(make([]byte, 1<<20)); err != nil {
		t.Fatalf("writing to the caller: %v", err)
	}
	caller, _ := openCall(t, ln)
	if _, err := caller.Write(make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	// The app's keep-alive probes get ACKs; the call is idle all the same.
	_, idle := openCall(t, ln)
	idle.(*net.TCPConn).SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: time.Second, Interval: time.Second})
	time.Sleep(1500 * time.Millisecond)
	if got, err := nl.established(port(ln), exclusions{idle: time.Second}); err != nil || got != (tally{calls: 2, excludedIdle: 1}) {
		t.Errorf("idle for 1s: %+v, %v; want 2 calls (bytes queued to send, to read), 1 idle", got, err)
	}
}

// TestDestroyEventsWakeForThePortOnly closes real connections: one on
// another port must not wake the stopper, one on the target port must, at
// once. sock_diag events need no privilege in one's own network namespace.
func TestDestroyEventsWakeForThePortOnly(t *testing.T) {
	target, other := listen(t), listen(t)
	wake, stop, err := watchDestroys(port(target), func(err error) { t.Errorf("events stopped: %v", err) })
	if err != nil {
		t.Skipf("skipped: this kernel or sandbox refuses sock_diag events: %v", err)
	}
	defer stop()

	closeOneCall(t, other)
	select {
	case <-wake:
		t.Fatal("woken by a socket closed on another port")
	case <-time.After(200 * time.Millisecond):
	}
	closed := time.Now()
	closeOneCall(t, target)
	select {
	case <-wake:
		t.Logf("woken %v after the close", time.Since(closed))
	case <-time.After(5 * time.Second):
		t.Fatal("no wake within 5s of a close on the target port")
	}
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func port(ln net.Listener) uint16 { return uint16(ln.Addr().(*net.TCPAddr).Port) }

// openCall opens a connection to ln, both ends closed when the test ends.
func openCall(t *testing.T, ln net.Listener) (caller, app net.Conn) {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// closeOneCall opens a connection to ln and closes both ends.
func closeOneCall(t *testing.T, ln net.Listener) {
	t.Helper()
	c, s := openCall(t, ln)
	c.Close()
	s.Close()
}

// TestDestroyEventsWakeWhenTheKernelDropsSome: with the socket's buffer
// full the kernel drops events and says so once (ENOBUFS); one of them may
// have been the last call's, so the stopper must count again, and go on.
func TestDestroyEventsWakeWhenTheKernelDropsSome(t *testing.T) {
	ln := listen(t)
	e := subscribe(t, port(ln))
	overflow(t, e, ln)
	wake := make(chan struct{}, 1)
	ended := make(chan error, 1)
	go func() { ended <- e.watch(wake) }()
	select {
	case <-wake:
	case err := <-ended:
		t.Fatalf("the watch ended on an overflow: %v", err)
	case <-time.After(5 * time.Second):
		t.Fatal("no wake within 5s of an overflow")
	}
	select {
	case err := <-ended:
		t.Fatalf("the watch ended after the overflow: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
}

// TestDestroyEventsFromOtherPortsNeverOverflow: churn on another port of
// the pod must not fill the event socket's buffer (each overflow wakes a
// recount), and an event of the target port must still get through.
func TestDestroyEventsFromOtherPortsNeverOverflow(t *testing.T) {
	target, other := listen(t), listen(t)
	e := subscribe(t, port(target))
	overflow(t, e, other)
	wake := make(chan struct{}, 1)
	go e.watch(wake)
	select {
	case <-wake:
		t.Fatal("woken by churn on another port")
	case <-time.After(200 * time.Millisecond):
	}
	closeOneCall(t, target)
	select {
	case <-wake:
	case <-time.After(5 * time.Second):
		t.Fatal("no wake within 5s of a close on the target port")
	}
}

// TestDestroyEventsOnlyFromTheKernel: any process in the pod may send a
// netlink message to the event socket's port id; only the kernel's count.
func TestDestroyEventsOnlyFromTheKernel(t *testing.T) {
	target := listen(t)
	e := subscribe(t, port(target))
	var self syscall.Sockaddr
	var err error
	e.rc.Control(func(fd uintptr) { self, err = syscall.Getsockname(int(fd)) })
	if err != nil {
		t.Fatal(err)
	}
	forger, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, netlinkSockDiag)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(forger)
	if err := syscall.Sendto(forger, destroyEvent(port(target)), 0, self); err != nil {
		t.Fatalf("sending a forged event: %v", err)
	}
	wake := make(chan struct{}, 1)
	go e.watch(wake)
	select {
	case <-wake:
		t.Fatal("woken by a forged event from another process's socket")
	case <-time.After(200 * time.Millisecond):
	}
}

// destroyEvent is a destroy event for a socket whose local port is sport.
func destroyEvent(sport uint16) []byte {
	b := make([]byte, nlmsgHdrLen+inetDiagMsgLen)
	binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
	binary.NativeEndian.PutUint16(b[4:], sockDiagByFamily)
	binary.BigEndian.PutUint16(b[nlmsgHdrLen+inetDiagSportOff:], sport)
	return b
}

// subscribe subscribes to the destroy events of port for the test, or
// skips it where the kernel or sandbox refuses them.
func subscribe(t *testing.T, port uint16) *destroyEvents {
	t.Helper()
	e, err := subscribeDestroyEvents(port)
	if err != nil {
		t.Skipf("skipped: this kernel or sandbox refuses sock_diag events: %v", err)
	}
	t.Cleanup(func() { e.f.Close() })
	return e
}

// overflow makes the event socket's buffer as small as the kernel allows
// and closes calls on ln, enough to fill it if their events get in.
func overflow(t *testing.T, e *destroyEvents, ln net.Listener) {
	t.Helper()
	e.rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1) })
	for range 100 {
		closeOneCall(t, ln)
	}
	time.Sleep(200 * time.Millisecond) // the kernel broadcasts from a work queue
}

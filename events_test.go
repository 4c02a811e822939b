//go:build linux

package main

import (
	"encoding/binary"
	"net"
	"syscall"
	"testing"
	"time"
)

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
	t.Cleanup(e.close)
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

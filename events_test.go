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

// closeOneCall opens a connection to ln and closes both ends.
func closeOneCall(t *testing.T, ln net.Listener) {
	t.Helper()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	s.Close()
}

func TestDestroyedOnPort(t *testing.T) {
	event := func(sport uint16) []byte {
		b := make([]byte, nlmsgHdrLen+inetDiagMsgLen)
		binary.NativeEndian.PutUint32(b[0:], uint32(len(b)))
		binary.NativeEndian.PutUint16(b[4:], sockDiagByFamily)
		binary.BigEndian.PutUint16(b[nlmsgHdrLen+inetDiagSportOff:], sport)
		return b
	}
	tests := []struct {
		name string
		b    []byte
		want bool
	}{
		{"another port", event(9090), false},
		{"the port", event(8080), true},
		{"the port, second in the datagram", append(event(9090), event(8080)...), true},
		{"the port in host byte order is not the port", event(0x901f), false},
		{"truncated header counts as ours", event(9090)[:10], true},
		{"length past the end counts as ours", event(9090)[:nlmsgHdrLen+8], true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := destroyedOnPort(tt.b, 8080); got != tt.want {
				t.Errorf("destroyedOnPort = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestDestroyEventsWakeWhenTheKernelDropsSome: with the socket's buffer
// full the kernel drops events and says so once (ENOBUFS); one of them may
// have been the last call's, so the stopper must count again, and go on.
func TestDestroyEventsWakeWhenTheKernelDropsSome(t *testing.T) {
	e, err := subscribeDestroyEvents()
	if err != nil {
		t.Skipf("skipped: this kernel or sandbox refuses sock_diag events: %v", err)
	}
	defer e.close()
	rc, err := e.f.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1) })
	ln := listen(t)
	for range 100 {
		closeOneCall(t, ln)
	}
	time.Sleep(200 * time.Millisecond) // the kernel broadcasts from a work queue
	wake := make(chan struct{}, 1)
	ended := make(chan error, 1)
	go func() { ended <- e.watch(1, wake) }() // port 1: no event of ours
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

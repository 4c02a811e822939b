// source.go picks where connection counts come from: the kernel's sock_diag
// netlink interface (netlink.go) or the /proc/net/tcp tables (procnet.go).
// Both are Linux's; on any other system the modes that count say so.

package main

import (
	"errors"
	"runtime"
)

// socketSource is where connection counts and listeners come from.
type socketSource interface {
	name() string
	established(port uint16, ex exclusions) (tally, error)
	listeners(port uint16) ([]uint64, error)
}

// errLinuxOnly is what counting answers elsewhere: the package builds on
// any system so that its portable tests run on a developer's machine.
var errLinuxOnly = errors.New("wsdrain runs on Linux: it counts connections through netlink sock_diag or /proc/net/tcp")

// openSource opens the source c names; auto is netlink unless the kernel or
// a sandbox (gVisor, a seccomp profile) refuses it, and then warn is told
// why /proc is used instead.
func openSource(c calls, warn func(msg string, err error)) (socketSource, error) {
	if runtime.GOOS != "linux" {
		return nil, errLinuxOnly
	}
	if c.source == "proc" {
		return newProcSource(), nil
	}
	nl, err := newNetlinkSource()
	switch {
	case err == nil:
		return nl, nil
	case c.source == "netlink":
		return nil, hintError{err, "--source netlink (which --ignore-idle needs) was refused here: use --source auto, without --ignore-idle"}
	}
	warn("netlink sock_diag unavailable; counting from /proc/net/tcp and tcp6", err)
	return newProcSource(), nil
}

// sourceFlag is --source: auto, netlink or proc.
type sourceFlag string

func (s *sourceFlag) String() string { return string(*s) }

func (s *sourceFlag) Set(v string) error {
	if v != "auto" && v != "netlink" && v != "proc" {
		return errors.New("want auto, netlink or proc")
	}
	*s = sourceFlag(v)
	return nil
}

//go:build !linux

package main

import "testing"

// TestLinuxOnly stands for the tests that are built on Linux only: the
// namespace end-to-end test, netlink, /proc processes and signalling.
func TestLinuxOnly(t *testing.T) {
	t.Skip("skipped: the end-to-end, netlink, process and signalling tests need Linux (CI runs them); the parser, flag, proxy and pipe tests ran")
}

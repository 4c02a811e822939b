//go:build !linux

// netlink_other.go is what netlink.go's callers get on systems other than
// Linux, which have no sock_diag: openSource refuses before it gets here.

package main

func newNetlinkSource() (socketSource, error) { return nil, errLinuxOnly }

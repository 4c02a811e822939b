//go:build !linux

// netlink_other.go is what netlink.go's and events.go's callers get on
// systems other than Linux, which have no sock_diag; openSource refuses
// first, so the stopper never counts there.

package main

func newNetlinkSource() (socketSource, error) { return nil, errLinuxOnly }

func watchDestroys(uint16, func(error)) (<-chan struct{}, func(), error) {
	return nil, nil, errLinuxOnly
}

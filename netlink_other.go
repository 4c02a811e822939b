//go:build !linux

// netlink_other.go stands in for netlink.go where there is no sock_diag:
// openSource refuses first, so nothing counts there.

package main

func newNetlinkSource() (socketSource, error) { return nil, errLinuxOnly }

func watchDestroys(uint16, func(error)) (<-chan struct{}, func(), error) {
	return nil, nil, errLinuxOnly
}

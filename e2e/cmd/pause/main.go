// Pause is the pod sandbox's PID 1 for the e2e cluster. With
// shareProcessNamespace it is PID 1 of the whole pod, so it must reap the
// zombies that hook processes leave behind; no registry is reachable here,
// so the usual pause image is replaced by this one.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}

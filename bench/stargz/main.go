// Command stargz-bench-snapshotter is the benchmark's stargz snapshotter: a containerd proxy
// snapshotter on a unix socket, built from Debian's stargz-snapshotter Go library.
//
// Debian ships the library (fs, fs/source, snapshot) and ctr-remote, not the upstream daemon
// (its service package needs the Kubernetes CRI API, which Debian lacks), so the benchmark
// wires the library's pieces together here: the lazy FUSE filesystem (fs.NewFilesystem), the
// overlay-based remote snapshotter on top of it (snapshot.NewSnapshotter) and containerd's
// snapshot gRPC service (contrib/snapshotservice). Registries on loopback are spoken to in
// plain HTTP, as the benchmark's registry is reached through proxies on 127.0.0.1.
//
// Every FUSE mount lives under -root; on SIGTERM or SIGINT the daemon stops serving, closes
// the snapshotter and unmounts whatever is still mounted under -root, deepest first, so the
// benchmark can stop it by PID and find nothing left behind.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	address := flag.String("address", "", "unix socket to serve the snapshot API on (required)")
	root := flag.String("root", "", "state directory: snapshots, layer caches, FUSE mounts (required)")
	level := flag.String("log-level", "warning", "logrus level: debug, info, warning, error")
	flag.Parse()
	if *address == "" || *root == "" {
		fmt.Fprintln(os.Stderr, "stargz-bench-snapshotter: -address and -root are required")
		os.Exit(2)
	}
	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		fmt.Fprintf(os.Stderr, "stargz-bench-snapshotter: -log-level %q: %v\n", *level, err)
		os.Exit(2)
	}
	logrus.SetLevel(lvl)
	if err := run(*address, *root); err != nil {
		fmt.Fprintf(os.Stderr, "stargz-bench-snapshotter: %v\n", err)
		os.Exit(1)
	}
}

// run serves until a termination signal, then tears everything down.
func run(address, root string) error {
	root, err := filepath.Abs(root)
	if err != nil {
		return err
	}
	ctx := context.Background()
	sn, err := newSnapshotter(ctx, root)
	if err != nil {
		return err
	}
	defer unmountUnder(root)
	defer sn.Close()

	if err := os.MkdirAll(filepath.Dir(address), 0o700); err != nil {
		return err
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	listener, err := net.Listen("unix", address)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", address, err)
	}
	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	select {
	case <-stop:
		server.Stop()
		return nil
	case err := <-served:
		return err
	}
}

// newSnapshotter is the lazy stargz filesystem under <root>/stargz and the remote-aware
// overlay snapshotter under <root>/snapshotter, as the upstream daemon lays them out.
func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, error) {
	// The library reads blobs through the host's http.Client transport and tunes retries when
	// that transport is go-retryablehttp's (the default client has a nil transport, which the
	// library cannot use).
	retrying := rhttp.NewClient()
	retrying.Logger = nil
	client := &http.Client{Transport: &rhttp.RoundTripper{Client: retrying}}
	configure := docker.ConfigureDefaultRegistries(
		docker.WithClient(client),
		docker.WithPlainHTTP(docker.MatchLocalhost),
	)
	hosts := func(spec reference.Spec) ([]docker.RegistryHost, error) {
		return configure(spec.Hostname())
	}
	cfg := config.Config{NoPrometheus: true}
	fsys, err := stargzfs.NewFilesystem(
		filepath.Join(root, "stargz"),
		cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)),
	)
	if err != nil {
		return nil, fmt.Errorf("stargz filesystem: %w", err)
	}
	sn, err := snapshot.NewSnapshotter(ctx, filepath.Join(root, "snapshotter"), fsys,
		snapshot.AsynchronousRemove)
	if err != nil {
		return nil, fmt.Errorf("stargz snapshotter: %w", err)
	}
	return emptyWalk{sn}, nil
}

// emptyWalk lists an empty store as empty: containerd's metadata store creates its buckets
// on the first write, and until then the library's Walk fails with "bucket does not exist".
// A client asking for the list before the first pull (readiness probe) deserves an answer.
type emptyWalk struct {
	snapshots.Snapshotter
}

func (s emptyWalk) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	err := s.Snapshotter.Walk(ctx, fn, filters...)
	if errdefs.IsNotFound(err) {
		return nil
	}
	return err
}

// unmountUnder detaches every mount at or below root, deepest first (FUSE layer mounts the
// snapshotter did not get to unmount itself).
func unmountUnder(root string) {
	for _, point := range mountsUnder(root) {
		if err := syscall.Unmount(point, 0); err != nil {
			if err := syscall.Unmount(point, syscall.MNT_DETACH); err != nil {
				logrus.WithError(err).Warnf("unmount %s", point)
			}
		}
	}
}

// mountsUnder lists the mount points at or below root from /proc/self/mountinfo.
func mountsUnder(root string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		logrus.WithError(err).Warn("read mountinfo")
		return nil
	}
	defer f.Close()
	var points []string
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		fields := strings.Fields(scanner.Text())
		if len(fields) < 5 {
			continue
		}
		point := strings.ReplaceAll(fields[4], `\040`, " ")
		if point == root || strings.HasPrefix(point, root+"/") {
			points = append(points, point)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	return points
}

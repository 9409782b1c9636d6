// airlock-runner is PID 1 of every Airlock task container.
//
// It is one static binary with no dependency on the image: Airlock mounts it read-only at
// /opt/airlock, so a task image needs no Python, glibc or musl. It fetches the task's JWT
// and secrets once from the task's endpoint socket into the credentials tmpfs, serves the
// local proxy port (and a local port per database secret) by relaying to that socket, answers
// names and serves the task's TLS ports on loopback for clients that ignore proxy settings
// (transparent.go), runs the task command as the container's unprivileged user, passes
// signals on to it, reaps orphaned processes, keeps the command's exit code, and after it
// ends hands the files under /workspace/output back to the orchestrator as one framed line
// on stdout.
//
// As a warm pool member (`--pool`) it first waits on the endpoint until a task claims it;
// until then it holds no identity and no secret.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	outputDir      = "/workspace/output"
	endpointSocket = "/run/airlock-endpoint/airlock.sock"
	tokenFile      = "/run/airlock/token"
	secretsDir     = "/run/airlock/secrets"
	gatewayCAFile  = "/run/airlock/gateway-ca.pem"
	caBundle       = "/run/airlock/ca-bundle.pem"
	helperDir      = "/opt/airlock" // airlock_task.py, for Python agents
	proxyPort      = 3128
	// Where a secret's wrapping token must have been created; anything else is refused.
	wrappedAt       = "sys/wrapping/wrap"
	bootstrapFailed = 111
	maxAnswer       = 8 << 20
)

// The image's own roots, for passthrough tunnels where the upstream's certificate arrives
// untouched; the first that exists is used.
var systemRoots = []string{
	"/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine
	"/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
	"/etc/ssl/cert.pem",                  // others
}

var forwarded = []os.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT}

type bootstrapError struct{ msg string }

func (e *bootstrapError) Error() string { return e.msg }

// unreachable: the endpoint could not be reached at all (the gateway may be restarting).
type unreachable struct{ bootstrapError }

func say(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "airlock-runner: "+format+"\n", args...)
}

// endpointCall POSTs to the task's endpoint and decodes its JSON answer into `into`; the
// socket itself is the task's identity. One request per connection: the endpoint answers
// with a length and closes.
func endpointCall(path string, body any, into any) error {
	payload, _ := json.Marshal(body)
	conn, err := net.DialTimeout("unix", endpointSocket, 30*time.Second)
	if err != nil {
		return &unreachable{bootstrapError{fmt.Sprintf("%s: %v", path, err)}}
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	request := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: airlock\r\nContent-Type: application/json\r\n"+
		"Content-Length: %d\r\nConnection: close\r\n\r\n", path, len(payload))
	if _, err := conn.Write(append([]byte(request), payload...)); err != nil {
		return &unreachable{bootstrapError{fmt.Sprintf("%s: %v", path, err)}}
	}
	status, answer, err := readAnswer(conn)
	if err != nil {
		return &bootstrapError{fmt.Sprintf("%s: %v", path, err)}
	}
	if len(answer) == 0 {
		answer = []byte("{}")
	}
	if status != 200 {
		var refused struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(answer, &refused) == nil && refused.Error != "" {
			return &bootstrapError{fmt.Sprintf("%s: %s", path, refused.Error)}
		}
		return &bootstrapError{fmt.Sprintf("%s: %d", path, status)}
	}
	if err := json.Unmarshal(answer, into); err != nil {
		return &bootstrapError{fmt.Sprintf("%s: %v", path, err)}
	}
	return nil
}

// readAnswer reads the status and Content-Length body of one HTTP answer.
func readAnswer(conn net.Conn) (int, []byte, error) {
	data, chunk := []byte{}, make([]byte, 65536)
	status, length, start := 0, -1, -1
	for {
		if start < 0 {
			if at := bytes.Index(data, []byte("\r\n\r\n")); at >= 0 {
				var err error
				if status, length, err = parseHead(string(data[:at])); err != nil {
					return 0, nil, err
				}
				start = at + 4
			}
		}
		if start >= 0 && length >= 0 && len(data)-start >= length {
			return status, data[start : start+length], nil
		}
		if len(data) > maxAnswer {
			return 0, nil, errors.New("the endpoint's answer is too long")
		}
		n, err := conn.Read(chunk)
		data = append(data, chunk[:n]...)
		if err == io.EOF && start >= 0 && length < 0 {
			return status, data[start:], nil
		}
		if err != nil && n == 0 {
			return 0, nil, errors.New("the endpoint closed the connection mid-answer")
		}
	}
}

func parseHead(head string) (status, length int, err error) {
	lines := strings.Split(head, "\r\n")
	fields := strings.SplitN(lines[0], " ", 3)
	if len(fields) < 2 {
		return 0, 0, fmt.Errorf("not an HTTP answer: %q", lines[0])
	}
	if status, err = strconv.Atoi(fields[1]); err != nil {
		return 0, 0, fmt.Errorf("not an HTTP status: %q", fields[1])
	}
	length = -1
	for _, line := range lines[1:] {
		name, value, _ := strings.Cut(line, ":")
		if strings.EqualFold(strings.TrimSpace(name), "content-length") {
			if length, err = strconv.Atoi(strings.TrimSpace(value)); err != nil || length < 0 {
				return 0, 0, fmt.Errorf("bad Content-Length: %q", value)
			}
		}
	}
	return status, length, nil
}

// splice carries bytes both ways until both sides are done; a side that ends its writing
// is half-closed on the other, so request-then-EOF clients still get their answer.
func splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if half, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = half.CloseWrite()
		} else {
			_ = dst.Close()
		}
		done <- struct{}{}
	}
	go pipe(a, b)
	go pipe(b, a)
	<-done
	<-done
	a.Close()
	b.Close()
}

// listen accepts connections on 127.0.0.1:port in the container, each served on its own.
func listen(port int, serve func(net.Conn)) error {
	listener, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return err
	}
	go func() {
		for {
			client, err := listener.Accept()
			if err != nil {
				var temporary interface{ Temporary() bool }
				if errors.As(err, &temporary) && temporary.Temporary() {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				return
			}
			go serve(client)
		}
	}()
	return nil
}

// relay is the local proxy port: bytes go to the endpoint unchanged; the gateway decides.
func relay(client net.Conn) {
	upstream, err := net.Dial("unix", endpointSocket)
	if err != nil {
		client.Close()
		return
	}
	splice(client, upstream)
}

// tunnel carries one local connection through the endpoint's CONNECT to `authority`;
// `first` is what the client already sent (sent on once the tunnel is open).
func tunnel(client net.Conn, authority, jwt string, first []byte) {
	upstream, err := net.Dial("unix", endpointSocket)
	if err == nil {
		err = openTunnel(client, upstream, authority, jwt)
	}
	if err == nil && len(first) > 0 {
		_, err = upstream.Write(first)
	}
	if err != nil {
		say("tunnel to %s: %v", authority, err)
		client.Close()
		if upstream != nil {
			upstream.Close()
		}
		return
	}
	splice(client, upstream)
}

func openTunnel(client, upstream net.Conn, authority, jwt string) error {
	_, err := fmt.Fprintf(upstream, "CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: Bearer %s\r\n\r\n",
		authority, authority, jwt)
	if err != nil {
		return err
	}
	head := make([]byte, 0, 4096)
	chunk := make([]byte, 4096)
	for !bytes.Contains(head, []byte("\r\n\r\n")) && len(head) < 8192 {
		n, err := upstream.Read(chunk)
		head = append(head, chunk[:n]...)
		if err != nil {
			break
		}
	}
	if !bytes.HasPrefix(head, []byte("HTTP/1.1 200")) {
		status, _, _ := bytes.Cut(head, []byte("\r\n"))
		return fmt.Errorf("endpoint refused the tunnel: %s", status)
	}
	_, rest, _ := bytes.Cut(head, []byte("\r\n\r\n"))
	if len(rest) > 0 {
		_, err = client.Write(rest)
	}
	return err
}

// writePrivate creates `path` (never replacing or following anything) readable by its owner.
func writePrivate(path, text string) error {
	fd, err := syscall.Open(path, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_EXCL|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0o400)
	if err != nil {
		return &bootstrapError{fmt.Sprintf("%s: %v", path, err)}
	}
	file := os.NewFile(uintptr(fd), path)
	defer file.Close()
	if _, err := file.WriteString(text); err != nil {
		return &bootstrapError{fmt.Sprintf("%s: %v", path, err)}
	}
	return nil
}

type secretGrant struct {
	Name       string         `json:"name"`
	WrapToken  string         `json:"wrap_token"`
	Connection map[string]any `json:"connection"`
}

type bootAnswer struct {
	JWT          string            `json:"jwt"`
	Secrets      []secretGrant     `json:"secrets"`
	Placeholders map[string]string `json:"placeholders"`
	CA           string            `json:"ca"`
	TLSPorts     []int             `json:"tls_ports"`
}

// bootstrap fetches the task's JWT and secrets once, into the credentials tmpfs, starts the
// local ports, and returns what the command's environment gains.
func bootstrap() (map[string]string, error) {
	env := map[string]string{}
	if _, err := os.Stat(endpointSocket); err != nil {
		return env, nil
	}
	var boot bootAnswer
	if err := endpointCall("/v1/bootstrap", struct{}{}, &boot); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(secretsDir, 0o700); err != nil {
		return nil, &bootstrapError{err.Error()}
	}
	if err := writePrivate(tokenFile, boot.JWT); err != nil {
		return nil, err
	}
	for _, secret := range boot.Secrets {
		if err := unwrapSecret(secret, boot.JWT); err != nil {
			return nil, err
		}
	}
	if err := listen(proxyPort, relay); err != nil {
		return nil, &bootstrapError{fmt.Sprintf("proxy port %d: %v", proxyPort, err)}
	}
	if len(boot.TLSPorts) > 0 {
		if err := serveDNS(); err != nil {
			say("names are not answered on loopback: %v", err)
		}
		for _, port := range boot.TLSPorts {
			serveTLSPort(port, boot.JWT)
		}
	}
	env["AIRLOCK_TOKEN_FILE"] = tokenFile
	env["AIRLOCK_SECRETS_DIR"] = secretsDir
	env["PYTHONPATH"] = helperDir
	// Credentials the gateway injects: the task holds only a placeholder for each.
	for name, value := range boot.Placeholders {
		env["AIRLOCK_CREDENTIAL_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_"))] = value
	}
	// Ordinary HTTP clients find the gateway through these, with the JWT as credential.
	// No NO_PROXY: every HTTP request, to any address, is the gateway's to decide.
	proxy := fmt.Sprintf("http://task:%s@127.0.0.1:%d", boot.JWT, proxyPort)
	for _, name := range []string{"HTTP_PROXY", "HTTPS_PROXY"} {
		env[name] = proxy
		env[strings.ToLower(name)] = proxy
	}
	if boot.CA != "" {
		if err := trust(boot.CA, env); err != nil {
			return nil, err
		}
	}
	return env, nil
}

func unwrapSecret(secret secretGrant, jwt string) error {
	var info struct {
		CreationPath string `json:"creation_path"`
	}
	if err := endpointCall("/v1/wrapping/lookup", map[string]string{"token": secret.WrapToken}, &info); err != nil {
		return err
	}
	if info.CreationPath != wrappedAt {
		return &bootstrapError{fmt.Sprintf("secret %s: wrapped at %q, expected %q; not unwrapping",
			secret.Name, info.CreationPath, wrappedAt)}
	}
	var unwrapped struct {
		Data map[string]any `json:"data"`
	}
	if err := endpointCall("/v1/wrapping/unwrap", map[string]string{"token": secret.WrapToken}, &unwrapped); err != nil {
		return err
	}
	document := unwrapped.Data
	if document == nil {
		document = map[string]any{}
	}
	if secret.Connection != nil {
		// The database is reachable only through the endpoint: forward a local port.
		host, _ := secret.Connection["host"].(string)
		port, _ := secret.Connection["port"].(float64)
		authority := net.JoinHostPort(host, strconv.Itoa(int(port)))
		err := listen(int(port), func(c net.Conn) { tunnel(c, authority, jwt, nil) })
		if err != nil {
			return &bootstrapError{fmt.Sprintf("secret %s: local port %d: %v", secret.Name, int(port), err)}
		}
		for key, value := range secret.Connection {
			document[key] = value
		}
		document["host"] = "127.0.0.1"
	}
	text, _ := json.Marshal(document)
	return writePrivate(filepath.Join(secretsDir, filepath.Base(secret.Name)), string(text))
}

// trust points every common client at a bundle of the image's own roots and the gateway CA.
func trust(ca string, env map[string]string) error {
	if err := writePrivate(gatewayCAFile, ca); err != nil {
		return err
	}
	roots := ""
	for _, path := range systemRoots {
		if data, err := os.ReadFile(path); err == nil {
			roots = string(data)
			break
		}
	}
	if err := writePrivate(caBundle, strings.TrimRight(roots, "\n")+"\n"+ca); err != nil {
		return err
	}
	for _, name := range []string{"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO"} {
		env[name] = caBundle
	}
	env["NODE_EXTRA_CA_CERTS"] = gatewayCAFile // node adds these to its own roots
	return nil
}

type outputFile struct {
	Name      string `json:"name"`
	Size      int64  `json:"size"`
	Truncated bool   `json:"truncated"`
	Data      string `json:"data"`
}

// readCapped reads at most `budget` bytes of a regular file without following links.
func readCapped(path string, budget int64) ([]byte, int64, bool) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, false
	}
	file := os.NewFile(uintptr(fd), path)
	defer file.Close()
	info, err := file.Stat()
	if err != nil || !info.Mode().IsRegular() {
		return nil, 0, false
	}
	data, err := io.ReadAll(io.LimitReader(file, budget))
	if err != nil {
		return nil, 0, false
	}
	return data, info.Size(), true
}

// collectOutput describes the output files, their contents capped at `maxBytes` in total.
func collectOutput(directory string, maxBytes int64) []outputFile {
	entries, err := os.ReadDir(directory)
	if err != nil {
		return []outputFile{}
	}
	names := make([]string, 0, len(entries))
	for _, entry := range entries {
		names = append(names, entry.Name())
	}
	sort.Strings(names)
	files, budget := []outputFile{}, maxBytes
	for _, name := range names {
		data, size, ok := readCapped(filepath.Join(directory, name), budget)
		if !ok {
			continue
		}
		budget -= int64(len(data))
		files = append(files, outputFile{name, size, int64(len(data)) < size, base64.StdEncoding.EncodeToString(data)})
	}
	return files
}

// lookPath finds `name` on the command's own PATH, as execvp would.
func lookPath(name string, env []string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, entry := range env {
		if strings.HasPrefix(entry, "PATH=") {
			path = entry[len("PATH="):]
		}
	}
	denied := false
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		candidate := filepath.Join(dir, name)
		info, err := os.Stat(candidate)
		if err != nil || info.IsDir() {
			continue
		}
		if syscall.Access(candidate, 1) == nil { // X_OK
			return candidate, nil
		}
		denied = true
	}
	if denied {
		return "", os.ErrPermission
	}
	return "", os.ErrNotExist
}

// run starts the command, forwards signals to it, reaps every child that ends (PID 1 is
// every orphan's parent), and returns the command's exit code.
func run(argv []string, env map[string]string) int {
	environ := make([]string, 0, len(env))
	for name, value := range env {
		environ = append(environ, name+"="+value)
	}
	sort.Strings(environ)
	// One goroutine does the waiting: signals to forward and SIGCHLD (reap without a
	// thread blocked in wait4) arrive on one channel. Every thread of the runner counts
	// against the task's pids limit, under gVisor several times over.
	signals := make(chan os.Signal, 16)
	signal.Notify(signals, append([]os.Signal{syscall.SIGCHLD}, forwarded...)...)
	program, err := lookPath(argv[0], environ)
	var process *os.Process
	if err == nil {
		process, err = os.StartProcess(program, argv, &os.ProcAttr{
			Env:   environ,
			Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		})
	}
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			say("command not found: %s", argv[0])
			return 127
		}
		say("permission denied: %s", argv[0])
		return 126
	}
	for {
		if code, done := reap(process.Pid); done {
			return code
		}
		if received := <-signals; received != syscall.SIGCHLD {
			_ = process.Signal(received)
		}
	}
}

// reap collects every child that has ended (PID 1 is every orphan's parent); the command's
// exit code once the command itself has ended.
func reap(command int) (int, bool) {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return 0, err == syscall.ECHILD
		}
		if pid != command {
			continue
		}
		if status.Signaled() {
			return 128 + int(status.Signal()), true
		}
		return status.ExitStatus(), true
	}
}

type launch struct {
	Env     map[string]string `json:"env"`
	Command []string          `json:"command"`
}

// awaitClaim: a warm runner waits on the endpoint until a task claims it.
func awaitClaim() (*launch, error) {
	for {
		var answer struct {
			Launch *launch `json:"launch"`
		}
		err := endpointCall("/v1/claim", struct{}{}, &answer)
		var gone *unreachable
		if errors.As(err, &gone) {
			time.Sleep(200 * time.Millisecond) // the gateway is restarting; the member waits
			continue
		}
		if err != nil {
			return nil, err
		}
		if answer.Launch != nil {
			return answer.Launch, nil
		}
	}
}

func main() {
	// One processor is plenty for a relay and a wait, and keeps the runner's threads few.
	runtime.GOMAXPROCS(1)
	os.Exit(runner(os.Args[1:]))
}

func runner(argv []string) int {
	env := map[string]string{}
	for _, entry := range os.Environ() {
		if name, value, ok := strings.Cut(entry, "="); ok {
			env[name] = value
		}
	}
	if len(argv) == 1 && argv[0] == "--pool" {
		claimed, err := awaitClaim()
		if err != nil {
			say("no task: %v", err)
			return bootstrapFailed
		}
		delete(env, "AIRLOCK_POOL_MEMBER")
		for name, value := range claimed.Env {
			env[name] = value
		}
		argv = claimed.Command
	}
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		say("no command given")
		return 2
	}
	marker := env["AIRLOCK_RESULT_MARKER"]
	delete(env, "AIRLOCK_RESULT_MARKER")
	maxBytes := int64(1 << 20)
	if value, ok := env["AIRLOCK_OUTPUT_MAX_BYTES"]; ok {
		if parsed, err := strconv.ParseInt(value, 10, 64); err == nil && parsed >= 0 {
			maxBytes = parsed
		}
		delete(env, "AIRLOCK_OUTPUT_MAX_BYTES")
	}
	// An image that does not know the task user leaves HOME at "/", which it cannot write.
	if home := env["HOME"]; home == "" || home == "/" {
		env["HOME"] = "/workspace"
	}
	_ = os.MkdirAll(outputDir, 0o755)
	gained, err := bootstrap()
	if err != nil {
		say("bootstrap failed: %v", err)
		return bootstrapFailed
	}
	for name, value := range gained {
		env[name] = value
	}
	code := run(argv, env)
	if marker != "" {
		frame, _ := json.Marshal(map[string]any{"exit_code": code, "files": collectOutput(outputDir, maxBytes)})
		// The frame starts with an ASCII record separator and a per-task nonce, so that the
		// orchestrator can tell it from whatever the command printed.
		_, _ = os.Stdout.Write([]byte("\x1e" + marker + " " + string(frame) + "\n"))
	}
	return code
}

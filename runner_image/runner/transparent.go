package main

// Clients that ignore proxy settings (Node's fetch, programs with their own transport) reach
// the gateway too. The container's resolver is the runner: every name resolves to loopback,
// where the runner serves each port the task reaches over TLS. A connection there is read up
// to the end of its ClientHello, whose server name (SNI) says where the client meant to go,
// and becomes the same CONNECT a proxied client would send, with the task's JWT: the gateway
// decides it exactly as it decides every other tunnel. Plain HTTP has no such name to read
// before the request and is served through the proxy settings only.

import (
	"encoding/binary"
	"errors"
	"net"
	"strconv"
	"time"
)

const (
	helloTimeout = 10 * time.Second
	maxHello     = 64 << 10
	dnsTTL       = 5 // seconds
)

var errNotTLS = errors.New("not a TLS ClientHello")

// serveTLSPort serves one TLS port on loopback; a port already taken (the proxy port, a
// database tunnel) is left to what holds it.
func serveTLSPort(port int, jwt string) {
	err := listen(port, func(client net.Conn) { transparentTunnel(client, port, jwt) })
	if err != nil {
		say("TLS port %d not served on loopback: %v", port, err)
	}
}

func transparentTunnel(client net.Conn, port int, jwt string) {
	_ = client.SetReadDeadline(time.Now().Add(helloTimeout))
	hello, name, err := readClientHello(client)
	_ = client.SetReadDeadline(time.Time{})
	if err != nil {
		say("connection to port %d: %v", port, err)
		client.Close()
		return
	}
	host := name
	if host == "" { // an address, not a name: the one the client dialled
		host, _, _ = net.SplitHostPort(client.LocalAddr().String())
	} else if !hostName(host) {
		say("connection to port %d: server name %q is not a host name", port, host)
		client.Close()
		return
	}
	tunnel(client, net.JoinHostPort(host, strconv.Itoa(port)), jwt, hello)
}

// hostName: letters, digits, hyphens and dots only, as DNS names are (RFC 1123), so that
// nothing but a name reaches the CONNECT line.
func hostName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// readClientHello reads TLS records until they hold the whole ClientHello; the bytes read
// (to be sent on unchanged) and the server name it carries ("" when it names none).
func readClientHello(conn net.Conn) ([]byte, string, error) {
	data, chunk := []byte{}, make([]byte, 16<<10)
	for {
		if body, complete, err := handshakeBody(data); err != nil {
			return nil, "", err
		} else if complete {
			name, err := serverName(body)
			return data, name, err
		}
		if len(data) > maxHello {
			return nil, "", errors.New("ClientHello too long")
		}
		n, err := conn.Read(chunk)
		data = append(data, chunk[:n]...)
		if err != nil && n == 0 {
			return nil, "", err
		}
	}
}

// handshakeBody joins the handshake records in `data`; the ClientHello's body once it is
// all there.
func handshakeBody(data []byte) ([]byte, bool, error) {
	var joined []byte
	for len(data) >= 5 {
		if data[0] != 0x16 || data[1] != 3 {
			return nil, false, errNotTLS
		}
		length := int(binary.BigEndian.Uint16(data[3:5]))
		if len(data) < 5+length {
			break
		}
		joined = append(joined, data[5:5+length]...)
		data = data[5+length:]
	}
	if len(data) > 0 && len(data) < 5 && data[0] != 0x16 {
		return nil, false, errNotTLS
	}
	if len(joined) < 4 {
		return nil, false, nil
	}
	if joined[0] != 1 { // client_hello
		return nil, false, errNotTLS
	}
	length := int(joined[1])<<16 | int(joined[2])<<8 | int(joined[3])
	if len(joined) < 4+length {
		return nil, false, nil
	}
	return joined[4 : 4+length], true, nil
}

// serverName finds the host_name of the server_name extension (RFC 6066) in a ClientHello.
func serverName(hello []byte) (string, error) {
	r := reader{data: hello}
	r.skip(2 + 32)       // version, random
	r.skip(int(r.u8()))  // session id
	r.skip(int(r.u16())) // cipher suites
	r.skip(int(r.u8()))  // compression methods
	extensions := reader{data: r.take(int(r.u16()))}
	for !r.bad && !extensions.bad && len(extensions.data) > 0 {
		kind, body := extensions.u16(), reader{data: extensions.take(int(extensions.u16()))}
		if kind != 0 {
			continue
		}
		names := reader{data: body.take(int(body.u16()))}
		for !names.bad && len(names.data) > 0 {
			nameType, name := names.u8(), names.take(int(names.u16()))
			if nameType == 0 && !names.bad {
				return string(name), nil
			}
		}
	}
	if r.bad || extensions.bad {
		return "", errNotTLS
	}
	return "", nil
}

// reader takes big-endian fields off a byte slice; a read past its end marks it bad.
type reader struct {
	data []byte
	bad  bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n > len(r.data) {
		r.bad = true
		return nil
	}
	out := r.data[:n]
	r.data = r.data[n:]
	return out
}

func (r *reader) skip(n int) { r.take(n) }

func (r *reader) u8() uint8 {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

// serveDNS answers the container's name queries on 127.0.0.1:53: every A question with the
// loopback address, anything else with no answer. The gateway, not the resolver, decides
// what a name may reach.
func serveDNS() error {
	conn, err := net.ListenPacket("udp", "127.0.0.1:53")
	if err != nil {
		return err
	}
	go func() {
		buffer := make([]byte, 1500)
		for {
			n, peer, err := conn.ReadFrom(buffer)
			if err != nil {
				return
			}
			if answer := dnsAnswer(buffer[:n]); answer != nil {
				_, _ = conn.WriteTo(answer, peer)
			}
		}
	}()
	return nil
}

// dnsAnswer is the answer to one DNS query (RFC 1035), or nil for what is not one.
func dnsAnswer(query []byte) []byte {
	// A standard query (not an answer, opcode 0) with one question.
	if len(query) < 12 || query[2]&0xf8 != 0 || binary.BigEndian.Uint16(query[4:6]) != 1 {
		return nil
	}
	end := 12
	for {
		if end >= len(query) || query[end]&0xc0 != 0 {
			return nil
		}
		if query[end] == 0 {
			end++
			break
		}
		end += 1 + int(query[end])
	}
	if end+4 > len(query) {
		return nil
	}
	question := query[12 : end+4]
	questionType := binary.BigEndian.Uint16(query[end : end+2])
	isA := questionType == 1 && binary.BigEndian.Uint16(query[end+2:end+4]) == 1
	answers := uint16(0)
	if isA {
		answers = 1
	}
	out := []byte{query[0], query[1], 0x80 | query[2]&0x01, 0x80, 0, 1, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(out[6:8], answers)
	out = append(out, question...)
	if isA {
		out = append(out, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, dnsTTL, 0, 4, 127, 0, 0, 1)
	}
	return out
}

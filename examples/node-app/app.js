'use strict';
// Example worker for `deployer master` (run it with `--ready pipe`), Node core only.
//
// - Serves on the socket the master passes as fd 3 (LISTEN_FDS / LISTEN_PID);
//   run alone it binds $PORT. With `--listen-fds N` the master passes N copies
//   of that socket (fds 3..N+2) and we listen on each: libuv (Node >= 20)
//   accepts one connection per listening handle per event-loop pass, so a
//   busy worker with one handle takes seconds to accept a reconnect burst.
// - Tells the master it is ready by writing `READY=1\n` to the pipe whose fd
//   is in $DEPLOYER_READY_FD (Node has no unix datagram sockets for sd_notify).
// - Drains correctly on SIGTERM. Careful: since Node 19, `server.close()` also
//   closes idle keep-alive connections at once, while a client may be sending
//   its next request on one: that is a failed request. So we stop accepting
//   with net.Server's close (which leaves open connections alone), answer every
//   further request with `Connection: close`, let an idle connection end at its
//   keep-alive timeout, and exit when none is left or at $SHUTDOWN_TIMEOUT.
//
// Routes: `/` (who answered), `/health` (200, or 500 with FAIL_HEALTH=1),
// `/slow?s=SECONDS` (an in-flight request).
// Switches (environment, or KEY=VALUE lines in ./release.env): CRASH_AT_BOOT=1,
// NEVER_READY=1, FAIL_HEALTH=1, BOOT_DELAY=SECONDS, CRASH_AFTER_BOOTS=N,
// IDLE_TIMEOUT=SECONDS (keep-alive, default 5), SHUTDOWN_TIMEOUT=SECONDS (30),
// WARMUP=N (serve N requests to itself before listening; see warmUp).

const fs = require('fs');
const http = require('http');
const net = require('net');
const path = require('path');

function loadReleaseEnv(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return;
  }
  for (const line of text.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0 && !line.startsWith('#')) process.env[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
}

const flag = (name) => !['', '0', undefined].includes(process.env[name]);

function failOnPurpose(why) {
  console.error(`${why}: failing on purpose`);
  process.exit(3);
}

function countBoot() {
  fs.appendFileSync('.boots', '.');
  return fs.statSync('.boots').size;
}

// listen() on the inherited socket sets the backlog of the queue every worker
// shares (Node's default is 511; with {fd} only a backlog given as the second
// argument counts, not options.backlog): ask for the deepest (the kernel caps it at
// net.core.somaxconn), or reconnect bursts during a reload overflow the queue
// and clients wait for SYN retransmits (1 s, 3 s...).
const BACKLOG = 65535;

function listenTargets() {
  const pids = [String(process.pid), String(process.ppid)]; // ppid: under a wrapper like npm
  const count = Number(process.env.LISTEN_FDS || 0);
  if (count >= 1 && pids.includes(process.env.LISTEN_PID)) {
    return Array.from({ length: count }, (_, i) => ({ fd: 3 + i }));
  }
  return [{ host: '127.0.0.1', port: Number(process.env.PORT || 8000) }];
}

function notifyReady() {
  const fd = process.env.DEPLOYER_READY_FD;
  if (fd) {
    fs.writeSync(Number(fd), 'READY=1\n');
    fs.closeSync(Number(fd));
  }
}

loadReleaseEnv('release.env');
if (flag('CRASH_AT_BOOT')) failOnPurpose('CRASH_AT_BOOT set');
const crashAfter = Number(process.env.CRASH_AFTER_BOOTS || 0);
if (crashAfter && countBoot() > crashAfter) failOnPurpose(`boot number > CRASH_AFTER_BOOTS=${crashAfter}`);

const release = path.basename(process.env.DEPLOYER_RELEASE || process.cwd());
let draining = false;
let served = 0; // reported at exit
let accepted = 0;

function send(res, status, body) {
  // Draining: this is the connection's last response, and the client is told.
  if (draining) res.setHeader('Connection', 'close');
  res.writeHead(status, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
  served += 1;
}

function handle(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/') return send(res, 200, `ok pid=${process.pid} release=${release}\n`);
  if (url.pathname === '/health') {
    return flag('FAIL_HEALTH') ? send(res, 500, 'unhealthy\n') : send(res, 200, 'healthy\n');
  }
  if (url.pathname === '/slow') {
    const seconds = Number(url.searchParams.get('s') || 1);
    setTimeout(() => send(res, 200, `slow ok pid=${process.pid} after ${seconds}s\n`), seconds * 1000);
    return undefined;
  }
  return send(res, 404, 'not found\n');
}

const targets = listenTargets();
const servers = targets.map(() => {
  const server = http.createServer(handle);
  server.keepAliveTimeout = Number(process.env.IDLE_TIMEOUT || 5) * 1000;
  server.on('connection', () => {
    accepted += 1;
  });
  return server;
});

function drain() {
  if (draining) return;
  draining = true;
  // net.Server's close, not http.Server's: stop accepting, keep open connections;
  // its callback runs once that server's last connection is gone.
  let open = servers.length;
  for (const server of servers) {
    net.Server.prototype.close.call(server, () => {
      open -= 1;
      if (open > 0) return;
      const cpu = process.cpuUsage();
      const seconds = ((cpu.user + cpu.system) / 1e6).toFixed(2);
      console.log(
        `pid ${process.pid} drained, exiting: ${served} requests on ${accepted} connections, ${seconds} s cpu`,
      );
      process.exit(0);
    });
  }
  setTimeout(() => process.exit(0), Number(process.env.SHUTDOWN_TIMEOUT || 30) * 1000).unref();
}
process.on('SIGTERM', drain);
process.on('SIGINT', drain);

function listenAll() {
  let pending = servers.length;
  servers.forEach((server, i) => {
    server.listen(targets[i], BACKLOG, () => {
      pending -= 1;
      if (pending > 0) return;
      if (!flag('NEVER_READY')) notifyReady();
      console.log(`pid ${process.pid} serving release ${release} on ${servers.length} handle(s)`);
    });
  });
}

// WARMUP=N: before listening on the shared socket (so before any client can be
// sent here), answer N requests for `/` from ourselves on a private port. V8
// runs a fresh process's code unoptimized for its first few thousand requests
// (~100 us each here, ~20 us once optimized), so without this the clients a new
// worker takes over during a reload see its slowest requests. The warm-up
// traffic looks like real traffic: 10 connections at a time, 5 requests in
// flight on each, a new connection every 50 requests (one pipelined connection
// leaves the accept and per-connection paths cold). A real app would warm its
// hottest routes the same way.
const WARMUP_CONNECTIONS = 10;
const WARMUP_PIPELINE = 5;
const WARMUP_PER_CONNECTION = 50;

function warmUp(count, done) {
  if (!count) return done();
  const started = process.hrtime.bigint();
  const batch = Buffer.from('GET / HTTP/1.1\r\nHost: warmup\r\n\r\n'.repeat(WARMUP_PIPELINE));
  const server = http.createServer(handle);
  const clients = new Set();
  let answered = 0;
  let finished = false;
  const finish = () => {
    if (finished) return;
    finished = true;
    clearTimeout(deadline);
    for (const client of clients) client.destroy();
    server.close(() => {
      served = 0; // the exit report counts real requests only
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      console.log(`pid ${process.pid} warmed up with ${answered} requests in ${ms.toFixed(0)} ms`);
      done();
    });
  };
  const connect = () => {
    const client = net.connect(server.address().port, '127.0.0.1');
    clients.add(client);
    client.on('close', () => clients.delete(client));
    client.on('error', () => {}); // the warm-up is best effort: 'close' follows
    let inFlight = 0;
    let onThis = 0;
    let tail = ''; // a status line may be split across two chunks
    const send = () => {
      client.write(batch);
      inFlight += WARMUP_PIPELINE;
    };
    client.on('connect', send);
    client.on('data', (chunk) => {
      const text = tail + chunk.toString('latin1');
      for (let i = text.indexOf('HTTP/1.1 '); i !== -1; i = text.indexOf('HTTP/1.1 ', i + 1)) {
        answered += 1;
        onThis += 1;
        inFlight -= 1;
      }
      tail = text.slice(-8); // shorter than 'HTTP/1.1 ': never counted twice
      if (inFlight > 0) return;
      if (answered >= count) {
        finish();
      } else if (onThis >= WARMUP_PER_CONNECTION) {
        client.destroy();
        connect();
      } else {
        send();
      }
    });
  };
  // Never let the warm-up keep a worker from serving.
  const deadline = setTimeout(finish, 10000);
  server.listen(0, '127.0.0.1', () => {
    for (let i = 0; i < WARMUP_CONNECTIONS; i += 1) connect();
  });
  return undefined;
}

setTimeout(
  () => warmUp(Number(process.env.WARMUP || 0), listenAll),
  Number(process.env.BOOT_DELAY || 0) * 1000,
);

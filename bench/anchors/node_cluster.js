'use strict';
// Anchor for bench/reload_under_load.py: the two Node cluster reload recipes
// operators copy today, unmodified in spirit (no deployer code):
//
//   node node_cluster.js sighup   SIGHUP: fork a fresh set of workers; once all
//                                 of them listen, kill() the old set.
//   node node_cluster.js usr2     SIGUSR2, the classic one-by-one recipe: for each
//                                 old worker, disconnect() it (its server.close()),
//                                 on its exit fork a replacement, on `listening`
//                                 go on with the next one.
//
// Workers: a plain http.createServer on $PORT (the primary shares it, round
// robin), default keep-alive. A worker that dies outside a reload is re-forked.
// The primary prints `RELOAD_DONE <ms>` when a reload has replaced every worker
// (what the harness counts as a finished reload) and ignores a reload signal
// while one is running.
const cluster = require('cluster');
const http = require('http');

const WORKERS = Number(process.env.WORKERS || 2);
const PORT = Number(process.env.PORT || 8000);

if (cluster.isPrimary) {
  const mode = process.argv[2];
  let reloading = false;
  for (let i = 0; i < WORKERS; i++) cluster.fork();
  cluster.on('listening', () => {
    if (!reloading && Object.keys(cluster.workers).length === WORKERS) console.log('READY');
  });
  cluster.on('exit', (worker) => {
    if (!reloading && !worker.exitedAfterDisconnect) cluster.fork();
  });

  const done = (started) => {
    reloading = false;
    console.log(`RELOAD_DONE ${Date.now() - started}`);
  };

  const sighup = () => {
    if (reloading) return;
    reloading = true;
    const started = Date.now();
    const old = Object.values(cluster.workers);
    let listening = 0;
    let exited = 0;
    for (let i = 0; i < old.length; i++) {
      cluster.fork().once('listening', () => {
        if (++listening < old.length) return;
        for (const w of old) {
          w.once('exit', () => { if (++exited === old.length) done(started); });
          w.kill();
        }
      });
    }
  };

  const usr2 = () => {
    if (reloading) return;
    reloading = true;
    const started = Date.now();
    const old = Object.values(cluster.workers);
    const restart = (i) => {
      if (i >= old.length) return done(started);
      const w = old[i];
      w.once('exit', () => {
        cluster.fork().once('listening', () => restart(i + 1));
      });
      w.disconnect();
    };
    restart(0);
  };

  if (mode === 'sighup') process.on('SIGHUP', sighup);
  else if (mode === 'usr2') process.on('SIGUSR2', usr2);
  else throw new Error(`usage: node node_cluster.js sighup|usr2 (got ${mode})`);
  process.on('SIGTERM', () => {
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  });
} else {
  http.createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.end(`ok pid=${process.pid}\n`);
  }).listen(PORT);
}

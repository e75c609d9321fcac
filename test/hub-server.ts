import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join, relative } from 'node:path';

/**
 * A small Hugging Face Hub on loopback for tests: the parts of the HTTP API that clients use to
 * resolve a revision, list a repo's files and download them (with Range requests), serving model
 * folders from disk. It can demand a token, cut a download short once, or corrupt a file, and it
 * logs every request so tests can see what was asked.
 */

interface RepoFile {
  readonly data: Buffer;
  readonly oid: string;
  readonly lfs?: { oid: string; size: number; pointerSize: number };
}

interface Repo {
  readonly commit: string;
  readonly files: Map<string, RepoFile>;
}

export interface HubRequest {
  readonly method: string;
  readonly path: string;
  readonly range: string | undefined;
}

const gitOid = (data: Buffer) =>
  createHash('sha1').update(`blob ${data.length}\0`).update(data).digest('hex');

export class TestHub {
  readonly requests: HubRequest[] = [];
  /** Bytes after which the next full download of a path is cut off (once). */
  readonly cutOnce = new Map<string, number>();
  /** Paths whose bytes are served altered. */
  readonly corrupt = new Set<string>();
  token: string | undefined;
  private readonly repos = new Map<string, Repo>();
  private server: Server | undefined;

  /** Adds a repo from a folder, plus extra files given inline. */
  addRepo(name: string, folder: string, extra: Record<string, Buffer | string> = {}): string {
    const files = new Map<string, RepoFile>();
    const add = (path: string, data: Buffer) => {
      const big = /\.(safetensors|bin|ckpt)$/.test(path) || data.length > 1_000_000;
      const sha256 = createHash('sha256').update(data).digest('hex');
      const pointer = `version https://git-lfs.github.com/spec/v1\noid sha256:${sha256}\nsize ${data.length}\n`;
      files.set(path, {
        data,
        oid: big ? gitOid(Buffer.from(pointer)) : gitOid(data),
        ...(big ? { lfs: { oid: sha256, size: data.length, pointerSize: pointer.length } } : {}),
      });
    };
    for (const entry of readdirSync(folder, { withFileTypes: true, recursive: true })) {
      if (!entry.isFile()) continue;
      const path = join(entry.parentPath, entry.name);
      add(relative(folder, path).split('\\').join('/'), readFileSync(path));
    }
    for (const [path, data] of Object.entries(extra)) add(path, Buffer.from(data));
    const commit = createHash('sha1')
      .update(name)
      .update([...files.values()].map((f) => f.oid).join())
      .digest('hex');
    this.repos.set(name, { commit, files });
    return commit;
  }

  async start(): Promise<string> {
    this.server = createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) =>
      this.server ? this.server.close(() => resolve()) : resolve(),
    );
  }

  private json(
    res: ServerResponse,
    status: number,
    body: unknown,
    headers: Record<string, string> = {},
  ) {
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(JSON.stringify(body));
  }

  private repoAt(name: string, revision: string): Repo | undefined {
    const repo = this.repos.get(name);
    return repo !== undefined && (revision === 'main' || revision === repo.commit)
      ? repo
      : undefined;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://hub');
    const path = decodeURIComponent(url.pathname);
    this.requests.push({ method: req.method ?? 'GET', path, range: req.headers.range });
    if (this.token !== undefined && req.headers.authorization !== `Bearer ${this.token}`) {
      this.json(
        res,
        401,
        { error: 'Invalid credentials in Authorization header' },
        { 'x-error-code': 'GatedRepo' },
      );
      return;
    }
    let m = /^\/api\/models\/([^/]+\/[^/]+)\/revision\/([^/]+)$/.exec(path);
    if (m !== null) {
      const repo = this.repoAt(m[1]!, m[2]!);
      if (repo === undefined) {
        this.json(
          res,
          404,
          { error: 'Repository not found' },
          { 'x-error-code': 'RepositoryNotFound' },
        );
        return;
      }
      this.json(res, 200, {
        _id: repo.commit.slice(0, 24),
        id: m[1],
        sha: repo.commit,
        private: false,
        gated: false,
        downloads: 0,
        likes: 0,
        pipeline_tag: 'text-to-image',
        lastModified: '2026-01-01T00:00:00.000Z',
        siblings: [...repo.files.keys()].map((rfilename) => ({ rfilename })),
      });
      return;
    }
    m = /^\/api\/models\/([^/]+\/[^/]+)\/tree\/([^/]+)$/.exec(path);
    if (m !== null) {
      const repo = this.repoAt(m[1]!, m[2]!);
      if (repo === undefined) {
        this.json(
          res,
          404,
          { error: 'Repository not found' },
          { 'x-error-code': 'RepositoryNotFound' },
        );
        return;
      }
      const dirs = new Set<string>();
      for (const p of repo.files.keys()) {
        const parts = p.split('/');
        for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
      }
      this.json(res, 200, [
        ...[...dirs].map((d) => ({
          type: 'directory',
          path: d,
          oid: gitOid(Buffer.from(d)),
          size: 0,
        })),
        ...[...repo.files].map(([p, f]) => ({
          type: 'file',
          path: p,
          size: f.lfs?.size ?? f.data.length,
          oid: f.oid,
          ...(f.lfs !== undefined ? { lfs: f.lfs } : {}),
        })),
      ]);
      return;
    }
    m = /^\/([^/]+\/[^/]+)\/resolve\/([^/]+)\/(.+)$/.exec(path);
    if (m !== null) {
      const repo = this.repoAt(m[1]!, m[2]!);
      const file = repo?.files.get(m[3]!);
      if (repo === undefined || file === undefined) {
        this.json(res, 404, { error: 'Entry not found' }, { 'x-error-code': 'EntryNotFound' });
        return;
      }
      let data = file.data;
      if (this.corrupt.has(m[3]!)) {
        data = Buffer.from(data);
        data[data.length >> 1] = data[data.length >> 1]! ^ 0xff;
      }
      const etag = file.lfs?.oid ?? file.oid;
      const headers: Record<string, string> = {
        etag: `"${file.oid}"`,
        'x-repo-commit': repo.commit,
        'accept-ranges': 'bytes',
        'content-type': 'application/octet-stream',
        ...(file.lfs !== undefined
          ? { 'x-linked-etag': `"${etag}"`, 'x-linked-size': String(file.lfs.size) }
          : {}),
      };
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
      let start = 0;
      let end = data.length - 1;
      if (range !== null) {
        start = Number(range[1]);
        end = range[2] === '' ? data.length - 1 : Math.min(Number(range[2]), data.length - 1);
        if (start >= data.length) {
          res.writeHead(416, { 'content-range': `bytes */${data.length}` });
          res.end();
          return;
        }
      }
      const body = data.subarray(start, end + 1);
      res.writeHead(range !== null ? 206 : 200, {
        ...headers,
        'content-length': String(body.length),
        ...(range !== null ? { 'content-range': `bytes ${start}-${end}/${data.length}` } : {}),
      });
      if (req.method === 'HEAD') {
        res.end();
        return;
      }
      const cut = this.cutOnce.get(m[3]!);
      if (cut !== undefined && body.length > cut) {
        this.cutOnce.delete(m[3]!);
        // Close the connection cleanly after `cut` bytes: the client sees a short body.
        res.write(body.subarray(0, cut), () => res.socket?.end());
        return;
      }
      res.end(body);
      return;
    }
    this.json(res, 404, { error: 'Not found' });
  }
}

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { chromium } from 'playwright-core';
import { createServer } from '../src/server/app.js';
import { repoRoot, tinyModel } from './helpers.js';

const CHROMIUM = process.env.GESSO_CHROMIUM ?? '/usr/bin/chromium';
const skip = existsSync(CHROMIUM)
  ? false
  : `Chromium is not installed at ${CHROMIUM} (apt-get install chromium, or set GESSO_CHROMIUM)`;

test(
  'the web page in a real Chromium: type a prompt, Generate, progress to 100 %, image in the gallery',
  { skip },
  async () => {
    const root = await mkdtemp(join(tmpdir(), 'gesso-web-'));
    const server = await createServer({
      // GESSO_WEB_MODEL: draw the README screenshot with a real model.
      model: process.env.GESSO_WEB_MODEL ?? (await tinyModel(join(root, 'tiny'))),
      out: join(root, 'out'),
      previewEvery: 1,
      runtime: { cacheDir: join(root, 'cache') },
    });
    const base = await server.app.listen({ host: '127.0.0.1', port: 0 });
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
    try {
      const page = await browser.newPage();
      const outside: string[] = [];
      page.on('request', (r) => {
        if (!r.url().startsWith(base) && !r.url().startsWith('data:')) outside.push(r.url());
      });
      const errors: string[] = [];
      page.on('pageerror', (e) => errors.push(e.message));
      await page.goto(base);
      await page.getByLabel('Prompt', { exact: true }).fill('a green square on a white background');
      await page.getByLabel('Steps').fill('12');
      await page.getByLabel('Seed').fill('77');
      // The keyboard alone: focus the prompt and press Ctrl+Enter.
      await page.getByLabel('Prompt', { exact: true }).press('Control+Enter');
      const seen = new Set<string>();
      for (let i = 0; i < 400; i++) {
        seen.add((await page.locator('#progress').getAttribute('aria-valuenow')) ?? '');
        if ((await page.locator('#gallery li').count()) > 0) break;
        await page.waitForTimeout(25);
      }
      assert.equal(
        await page
          .locator('#progress')
          .inputValue()
          .catch(() => null),
        null,
      ); // <progress> is not an input
      assert.equal(
        await page.locator('#progress').evaluate((p) => (p as unknown as { value: number }).value),
        100,
      );
      assert.ok(
        [...seen].some((v) => v !== '' && v !== '0' && v !== '100'),
        `progress values seen: ${[...seen].join(',')}`,
      );
      await assert.doesNotReject(
        page.locator('#status').filter({ hasText: 'Done: 1 image' }).waitFor(),
      );
      const item = page.locator('#gallery li').first();
      await assert.doesNotReject(item.locator('img').waitFor());
      const loaded = await item
        .locator('img')
        .evaluate((img) => (img as unknown as { naturalWidth: number }).naturalWidth);
      assert.equal(loaded, 64);
      assert.match(
        await item.locator('pre').innerText(),
        /a green square on a white background[\s\S]*Seed: 77/,
      );
      // Reuse puts the settings back in the form.
      await page.getByLabel('Prompt', { exact: true }).fill('something else');
      await item.getByRole('button', { name: 'Reuse settings' }).click();
      assert.equal(
        await page.getByLabel('Prompt', { exact: true }).inputValue(),
        'a green square on a white background',
      );
      assert.equal(await page.getByLabel('Seed').inputValue(), '77');
      assert.deepEqual(outside, [], 'the page made requests off the server');
      assert.deepEqual(errors, []);
      await page.screenshot({ path: join(root, 'page.png') });
      if (process.env.GESSO_SCREENSHOT !== undefined)
        await writeFile(
          join(repoRoot, process.env.GESSO_SCREENSHOT),
          await page.screenshot({ fullPage: true }),
        );
    } finally {
      await browser.close();
      await server.close();
      await rm(root, { recursive: true, force: true });
    }
  },
);

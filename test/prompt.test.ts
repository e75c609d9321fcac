import assert from 'node:assert/strict';
import test from 'node:test';
import { StableDiffusionPipeline } from '../src/pipelines/stable-diffusion.js';
import { ClipTokenizer } from '../src/tokenizers/index.js';
import { comfyPromptChunks, parseComfyWeights } from '../src/tokenizers/comfy-prompt.js';
import { parsePromptAttention, promptChunks } from '../src/tokenizers/prompt.js';
import { golden, needsGolden } from './helpers.js';

const close = (a: number, b: number) => Math.abs(a - b) < 1e-9;

test('A1111 emphasis parses as its own documentation says', () => {
  // The examples of AUTOMATIC1111's parse_prompt_attention docstring, with its values.
  const cases: [string, [string, number][]][] = [
    ['normal text', [['normal text', 1]]],
    [
      'an (important) word',
      [
        ['an ', 1],
        ['important', 1.1],
        [' word', 1],
      ],
    ],
    ['(unbalanced', [['unbalanced', 1.1]]],
    ['\\(literal\\]', [['(literal]', 1]]],
    ['(unnecessary)(parens)', [['unnecessaryparens', 1.1]]],
    [
      'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).',
      [
        ['a ', 1],
        ['house', 1.5730000000000004],
        [' ', 1.1],
        ['on', 1],
        [' a ', 1.1],
        ['hill', 0.55],
        [', sun, ', 1.1],
        ['sky', 1.4641000000000006],
        ['.', 1.1],
      ],
    ],
    ['', [['', 1]]],
    [
      'a BREAK b',
      [
        ['a', 1],
        ['BREAK', -1],
        ['b', 1],
      ],
    ],
    ['[faded]', [['faded', 1 / 1.1]]],
  ];
  assertParses(parsePromptAttention, cases);
});

/** Each text parses into these pieces, weights within 1e-9. */
function assertParses(
  parse: (text: string) => [string, number][],
  cases: readonly [string, [string, number][]][],
): void {
  for (const [text, expected] of cases) {
    const got = parse(text);
    assert.equal(got.length, expected.length, `${text}: ${JSON.stringify(got)}`);
    got.forEach(([t, w], i) => {
      assert.equal(t, expected[i]![0], text);
      assert.ok(close(w, expected[i]![1]), `${text}: ${t} ${w} ≠ ${expected[i]![1]}`);
    });
  }
}

test(
  'long prompts: chunks of 75 tokens, a comma within 20 tokens moves the tail, BREAK cuts',
  needsGolden(),
  async () => {
    const tokenizer = await ClipTokenizer.fromFolder(golden('sd1-tiny', 'sd-tiny', 'tokenizer'));
    const one = tokenizer.tokenize('cat');
    assert.equal(one.length, 1);
    const cat = one[0]!;
    const comma = tokenizer.commaId!;
    // 100 single-token words: 75 in the first chunk, 25 in the second.
    const plain = promptChunks(tokenizer, Array.from({ length: 100 }, () => 'cat').join(' '));
    assert.equal(plain.ids.length, 2);
    assert.deepEqual(plain.ids[0], [
      tokenizer.bosId,
      ...new Array<number>(75).fill(cat),
      tokenizer.eosId,
    ]);
    assert.deepEqual(plain.ids[1]!.slice(0, 27), [
      tokenizer.bosId,
      ...new Array<number>(25).fill(cat),
      tokenizer.eosId,
    ]);
    assert.equal(plain.ids[1]!.length, 77);
    // A comma at position 60: when the chunk fills, the 14 tokens after it move on.
    const words = [...new Array<string>(60).fill('cat'), ',', ...new Array<string>(40).fill('cat')];
    const backtracked = promptChunks(tokenizer, words.join(' '));
    assert.equal(backtracked.ids.length, 2);
    assert.equal(backtracked.ids[0]!.indexOf(tokenizer.eosId), 1 + 61); // 60 cats and the comma
    assert.equal(backtracked.ids[0]![61], comma);
    assert.equal(backtracked.ids[1]!.filter((id) => id === cat).length, 40);
    // Weights follow their tokens; specials and padding weigh 1.
    const weighted = promptChunks(tokenizer, 'a (red:1.5) cat BREAK [blue] dog');
    assert.equal(weighted.ids.length, 2);
    assert.deepEqual(weighted.weights[0]!.slice(0, 5), [1, 1, 1.5, 1, 1]);
    assert.ok(close(weighted.weights[1]![1]!, 1 / 1.1));
  },
);

test(
  'emphasis: token states times their weights, rescaled to the unweighted mean; long prompts reach the UNet',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
      cacheDir: false,
    });
    const plain = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false, 'plain');
    const weighted = await pipe.encodePrompts(
      ['a (red:1.5) circle'],
      undefined,
      1,
      0,
      false,
      'a1111',
    );
    // The same tokens: work out the weighted states by hand from the plain ones, in float64.
    const z = plain.embeddings;
    const [, tokens, width] = z.shape as [number, number, number];
    const weights = new Array<number>(tokens).fill(1);
    weights[2] = 1.5; // start, "a", "red", ...
    let before = 0;
    let after = 0;
    for (let t = 0; t < tokens; t++)
      for (let k = 0; k < width; k++) {
        before += z.data[t * width + k]!;
        after += z.data[t * width + k]! * weights[t]!;
      }
    for (let t = 0; t < tokens; t++)
      for (let k = 0; k < width; k++) {
        const expected = (z.data[t * width + k]! * weights[t]! * before) / after;
        assert.ok(
          Math.abs(weighted.embeddings.data[t * width + k]! - expected) < 1e-5,
          `token ${t}`,
        );
      }
    // No emphasis and a short prompt: A1111 syntax gives exactly the plain encoding.
    const same = await pipe.encodePrompts(['a red circle'], undefined, 1, 0, false, 'a1111');
    assert.deepEqual(same.embeddings.data, plain.embeddings.data);

    // 120 tokens against an empty negative prompt: both become two chunks (154 tokens).
    const long = Array.from({ length: 120 }, () => 'red').join(' ');
    const both = await pipe.encodePrompts([long], [''], 1, 0, true, 'a1111');
    assert.deepEqual(both.embeddings.shape, [2, 154, width]);
    const result = await pipe.generate({
      prompt: long,
      steps: 2,
      guidance: 5,
      seed: 1,
      promptSyntax: 'a1111',
    });
    assert.deepEqual(result.images.shape.slice(1), [64, 64, 3]);
    await pipe.release();
  },
);

test('ComfyUI emphasis parses as comfy/sd1_clip.py token_weights does', () => {
  // Worked out by hand from token_weights and parse_parentheses: (x) multiplies by 1.1, (x:w)
  // sets w and replaces the outer weight, [x] and an unclosed ( are text, \( \) are literal.
  const cases: [string, [string, number][]][] = [
    ['normal text', [['normal text', 1]]],
    [
      'an (important) word',
      [
        ['an ', 1],
        ['important', 1.1],
        [' word', 1],
      ],
    ],
    [
      'a ((red)) [big] (cat:0.5)',
      [
        ['a ', 1],
        ['red', 1.1 * 1.1],
        [' [big] ', 1],
        ['cat', 0.5],
      ],
    ],
    [
      '(outer (inner:1.5) rest)',
      [
        ['outer ', 1.1],
        ['inner', 1.5],
        [' rest', 1.1],
      ],
    ],
    ['(unbalanced', [['(unbalanced', 1]]],
    [
      '\\(literal\\) (x:y)',
      [
        ['(literal) ', 1],
        ['x:y', 1.1],
      ],
    ],
    ['(a: 2 )', [['a', 2]]],
    ['(a:1e-1)', [['a', 0.1]]],
  ];
  assertParses(parseComfyWeights, cases);
});

test(
  'ComfyUI chunks: whole words move to the next chunk, long words split, padding as the tokenizer pads',
  needsGolden(),
  async () => {
    const tokenizer = await ClipTokenizer.fromFolder(golden('sd1-tiny', 'sd-tiny', 'tokenizer'));
    const cat = tokenizer.tokenize('cat')[0]!;
    const plain = comfyPromptChunks(tokenizer, Array.from({ length: 100 }, () => 'cat').join(' '));
    assert.deepEqual(plain.ids[0], [
      tokenizer.bosId,
      ...new Array<number>(75).fill(cat),
      tokenizer.eosId,
    ]);
    assert.deepEqual(plain.ids[1]!.slice(0, 27), [
      tokenizer.bosId,
      ...new Array<number>(25).fill(cat),
      tokenizer.eosId,
    ]);
    assert.ok(plain.ids[1]!.slice(27).every((id) => id === tokenizer.padId));
    // A word of several tokens that would cross the boundary moves whole (no comma rule).
    const word = 'cat,cat,cat'; // five tokens, one word to ComfyUI
    const five = tokenizer.tokenize(word);
    assert.equal(five.length, 5);
    const moved = comfyPromptChunks(
      tokenizer,
      [...new Array<string>(73).fill('cat'), word].join(' '),
    );
    assert.equal(moved.ids.length, 2);
    assert.equal(moved.ids[0]!.indexOf(tokenizer.eosId), 74);
    assert.deepEqual(moved.ids[1]!.slice(1, 6), five);
    // A word of 8 tokens or more is cut where the chunk ends.
    const long = 'cat,cat,cat,cat,cat'; // nine tokens
    const cut = comfyPromptChunks(
      tokenizer,
      [...new Array<string>(73).fill('cat'), long].join(' '),
    );
    assert.equal(cut.ids[0]![76], tokenizer.eosId);
    assert.deepEqual(
      [...cut.ids[0]!.slice(74, 76), ...cut.ids[1]!.slice(1, 8)],
      tokenizer.tokenize(long),
    );
    // Weights follow tokens; the empty text is one chunk of start, end and padding.
    const weighted = comfyPromptChunks(tokenizer, 'a (red:1.5) cat');
    assert.deepEqual(weighted.weights[0]!.slice(0, 5), [1, 1, 1.5, 1, 1]);
    assert.deepEqual(comfyPromptChunks(tokenizer, '').ids, [
      [tokenizer.bosId, tokenizer.eosId, ...new Array<number>(75).fill(tokenizer.padId)],
    ]);
  },
);

test(
  'ComfyUI weights: a weighted token’s state is moved from the empty text’s by its weight, nothing rescaled',
  needsGolden(),
  async () => {
    const pipe = await StableDiffusionPipeline.fromPretrained(golden('sd1-tiny', 'sd-tiny'), {
      cacheDir: false,
    });
    try {
      const encode = async (text: string, syntax: 'plain' | 'comfy') =>
        (await pipe.encodePrompts([text], undefined, 1, 0, false, syntax)).embeddings;
      const plain = await encode('a red circle', 'plain');
      const empty = await encode('', 'plain');
      const weighted = await encode('a (red:1.5) (circle)', 'comfy');
      const [, tokens, width] = plain.shape as [number, number, number];
      const weights = new Array<number>(tokens).fill(1);
      weights[2] = 1.5; // start, "a", "red", "circle"
      weights[3] = 1.1;
      for (let t = 0; t < tokens; t++)
        for (let k = 0; k < width; k++) {
          const i = t * width + k;
          const expected = (plain.data[i]! - empty.data[i]!) * weights[t]! + empty.data[i]!;
          assert.ok(Math.abs(weighted.data[i]! - expected) < 1e-5, `token ${t}`);
        }
      // Without weights ComfyUI's reading is the plain one; [x] is text, as the plain reading.
      assert.deepEqual((await encode('a red circle', 'comfy')).data, plain.data);
      assert.deepEqual(
        (await encode('a [red] circle', 'comfy')).data,
        (await encode('a [red] circle', 'plain')).data,
      );
    } finally {
      await pipe.release();
    }
  },
);

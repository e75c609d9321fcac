import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import test from 'node:test';
import protobuf from 'protobufjs';
import { onnxSchema } from '../src/graph/onnx.js';

const OFFICIAL = process.env.ONNX_PROTO_PATH ?? '/usr/include/onnx/onnx.proto';

function* walk(ns: protobuf.NamespaceBase): Generator<protobuf.Type | protobuf.Enum> {
  for (const nested of ns.nestedArray) {
    if (nested instanceof protobuf.Type || nested instanceof protobuf.Enum) yield nested;
    if (nested instanceof protobuf.Namespace || nested instanceof protobuf.Type)
      yield* walk(nested);
  }
}

test(
  "gesso's ONNX schema agrees field by field with the official onnx.proto",
  {
    skip: existsSync(OFFICIAL)
      ? false
      : `the official onnx.proto is absent (${OFFICIAL}; Debian package libonnx-dev provides it)`,
  },
  () => {
    const official = protobuf.parse(readFileSync(OFFICIAL, 'utf8'), { keepCase: true }).root;
    let fields = 0;
    for (const item of walk(onnxSchema())) {
      const name = item.fullName.slice(1);
      const theirs = official.lookup(name);
      assert.ok(theirs !== null, `${name} exists in the official schema`);
      if (item instanceof protobuf.Enum) {
        assert.ok(theirs instanceof protobuf.Enum);
        for (const [key, value] of Object.entries(item.values))
          assert.equal(theirs.values[key], value, `${name}.${key}`);
        continue;
      }
      assert.ok(theirs instanceof protobuf.Type);
      for (const field of item.fieldsArray) {
        const other: protobuf.Field | undefined = theirs.fields[field.name];
        assert.ok(other !== undefined, `${name}.${field.name} exists`);
        assert.equal(field.id, other.id, `${name}.${field.name} number`);
        assert.equal(field.type, other.type, `${name}.${field.name} type`);
        assert.equal(field.repeated, other.repeated, `${name}.${field.name} repeated`);
        assert.equal(field.packed, other.packed, `${name}.${field.name} packed`);
        assert.equal(field.partOf?.name, other.partOf?.name, `${name}.${field.name} oneof`);
        fields++;
      }
    }
    assert.ok(fields > 60, `${fields} fields compared`);
  },
);

// Posts images as multipart `image` parts with java.net.http.HttpClient, building the body by
// hand as Java users do (the JDK has no multipart encoder), and prints the status and the
// answer's body, for tests/clients.rs.
//
//     java MultipartClient.java URL FILE...
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;

public class MultipartClient {
    public static void main(String[] args) throws Exception {
        String boundary = "----JavaBoundary" + UUID.randomUUID().toString().replace("-", "");
        List<byte[]> body = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            Path file = Path.of(args[i]);
            String head = "--" + boundary + "\r\n"
                + "Content-Disposition: form-data; name=\"image\"; filename=\"" + file.getFileName() + "\"\r\n"
                + "Content-Type: " + (i % 2 == 0 ? "application/octet-stream" : "image/png") + "\r\n\r\n";
            body.add(head.getBytes(StandardCharsets.UTF_8));
            body.add(Files.readAllBytes(file));
            body.add("\r\n".getBytes(StandardCharsets.UTF_8));
        }
        body.add(("--" + boundary + "--\r\n").getBytes(StandardCharsets.UTF_8));
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
            .header("Content-Type", "multipart/form-data; boundary=" + boundary)
            .POST(HttpRequest.BodyPublishers.ofByteArrays(body))
            .build();
        HttpResponse<String> response = HttpClient.newHttpClient().send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println("{\"status\": " + response.statusCode() + ", \"body\": " + response.body() + "}");
    }
}
